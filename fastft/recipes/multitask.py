"""Multi-task learning: one shared encoder, a sentence-classification head and a token-tagging head,
trained on a weighted sum of the two losses, with per-task metrics.

    fastft train recipes/multitask.toml

Data: :func:`fastft.recipes.generators.reviews`: each sentence has a sentiment label and a
named-entity tag per word (O / PER / LOC; the first sub-token of a word carries its tag). Loss per
example: ``label_weight * CE(sentiment) + tags_weight * mean CE over its tagged tokens`` (both
fastft.ops.cross_entropy), summed and divided by the step's example count, so accumulation and ranks
stay exact. Metrics (scikit-learn): ``label_accuracy`` / ``label_f1_macro`` / ``label_f1_weighted``,
``tags_f1`` (macro F1 over the entity tags PER and LOC, per first sub-token), ``tags_accuracy``, and
``mean_f1`` (the mean of label_f1_macro and tags_f1: one number for early stopping).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastft.runtime.config import ConfigError
from fastft.runtime.models import register_model
from fastft.runtime.tasks import register_task

from . import generators
from .common import (EncoderTask, classification_scores, cross_entropy, encoder_with_heads, predict, recipe_options,
                     word_targets)


@dataclass(frozen=True)
class MultiTaskOptions:
    label_weight: float = 1.0
    tags_weight: float = 1.0
    proportions: list = (0.1, 0.3, 0.6)
    head_dropout: float = 0.1

    def validate(self) -> None:
        if self.label_weight < 0 or self.tags_weight < 0 or self.label_weight + self.tags_weight <= 0:
            raise ConfigError("recipe.options.label_weight and tags_weight must be >= 0, not both 0")


@register_model("multitask_encoder")
def multitask_encoder(cfg):
    o = recipe_options(MultiTaskOptions, cfg)
    heads = {"label": (len(generators.SENTIMENTS), "sequence"), "tags": (len(generators.TAGS), "token")}
    return encoder_with_heads(cfg, heads, o.head_dropout)


def per_example_token_loss(cfg, logits: Tensor, targets: Tensor) -> Tensor:
    """[B] mean cross-entropy over each example's counted tokens (-100 ignored)."""
    per_token = cross_entropy(cfg, logits, targets, reduction="none").reshape(targets.shape)
    counted = (targets != -100).sum(-1).clamp_min(1)
    return per_token.sum(-1) / counted


@register_task("multitask")
class MultiTask(EncoderTask):
    options_class = MultiTaskOptions
    metrics = {"loss": False, "label_accuracy": True, "label_f1_macro": True, "label_f1_weighted": True,
               "tags_f1": True, "tags_accuracy": True, "mean_f1": True}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        data = cfg.data
        self.train_samples = [self.sample(r) for r in generators.reviews(data.num_train, cfg.run.seed,
                                                                          self.options.proportions)]
        self.eval_samples = [self.sample(r) for r in generators.reviews(data.num_eval, cfg.run.seed + 1_000_003,
                                                                         self.options.proportions)]

    def sample(self, record: dict) -> dict:
        enc = self.tokenizer(record["words"], is_split_into_words=True, truncation=True,
                             max_length=self.cfg.data.max_length)
        return {"input_ids": enc["input_ids"], "labels": record["label"],
                "tags": word_targets(enc.word_ids(), record["tags"])}

    def _per_example(self, out: dict, batch: dict) -> Tensor:
        o = self.options
        label = cross_entropy(self.cfg, out["label"], batch["labels"], reduction="none")
        tags = per_example_token_loss(self.cfg, out["tags"], batch["tags"])
        return o.label_weight * label + o.tags_weight * tags

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        return self._per_example(self.forward(model, batch), batch).sum() / normalizer

    def evaluate(self, model: nn.Module, d) -> dict:
        from sklearn.metrics import accuracy_score, f1_score

        outputs = predict(model, self, self.eval_samples, d.device)
        loss = sum(self._per_example(o["logits"], o["batch"]).sum().item() for o in outputs) / len(self.eval_samples)
        labels = torch.cat([o["batch"]["labels"] for o in outputs]).numpy()
        predicted = torch.cat([o["logits"]["label"].argmax(-1) for o in outputs]).numpy()
        metrics = {"loss": loss, **classification_scores(labels, predicted, "label_")}
        tags = torch.cat([o["batch"]["tags"].flatten() for o in outputs])
        tag_predictions = torch.cat([o["logits"]["tags"].argmax(-1).flatten() for o in outputs])
        keep = tags != -100
        entities = [generators.TAGS.index(t) for t in ("PER", "LOC")]
        metrics["tags_f1"] = float(f1_score(tags[keep].numpy(), tag_predictions[keep].numpy(), labels=entities,
                                            average="macro", zero_division=0))
        metrics["tags_accuracy"] = float(accuracy_score(tags[keep].numpy(), tag_predictions[keep].numpy()))
        metrics["mean_f1"] = (metrics["label_f1_macro"] + metrics["tags_f1"]) / 2
        return metrics
