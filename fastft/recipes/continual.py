"""Continual learning: two tasks in sequence on one encoder, with an EWC penalty (Kirkpatrick et al.
2017) from a diagonal Fisher estimate against plain fine-tuning; forgetting of the first task measured.

    fastft train recipes/continual.toml                                  # EWC
    fastft train recipes/continual.toml --recipe.options.ewc_lambda=0    # plain sequential fine-tuning

Task A (steps 0 .. steps_per_task - 1): the sentiment of generated reviews. Task B (the rest): the
region of the city a review mentions (cities in three fixed groups), on other reviews, with its own
head. When B starts, the task is evaluated (``eval_a_accuracy`` right after A), the diagonal
empirical Fisher of A's log-likelihood is estimated from ``fisher_samples`` training examples (squared
per-example gradients, averaged) and the weights are kept as the anchor theta*; during B the extra loss
``ewc_lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`` (a Callback's ``extra_loss``) holds the weights A
needs. Metrics: ``a_accuracy``, ``b_accuracy`` and, once B has started, ``forgetting`` = A's accuracy
right after A minus its accuracy now. The Fisher and the anchor live in memory: a run resumed during
B starts B over from its checkpoint without them (resume before B, or run it whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastft.runtime.config import ConfigError
from fastft.runtime.models import register_model
from fastft.runtime.parallel import unwrap
from fastft.runtime.tasks import register_task
from fastft.runtime.trainer import Callback

from . import generators
from .common import EncoderTask, cross_entropy, encoder_with_heads, predict, recipe_options
from .text_classification import encode_words

REGIONS = 3


@dataclass(frozen=True)
class ContinualOptions:
    steps_per_task: int = 40
    ewc_lambda: float = 1000.0    # 0: plain sequential fine-tuning
    fisher_samples: int = 64

    def validate(self) -> None:
        if self.steps_per_task < 1 or self.fisher_samples < 1 or self.ewc_lambda < 0:
            raise ConfigError("recipe.options: steps_per_task and fisher_samples must be >= 1, ewc_lambda >= 0")


@register_model("continual_encoder")
def continual_encoder(cfg):
    recipe_options(ContinualOptions, cfg)  # bad options fail before the encoder loads
    heads = {"a": (len(generators.SENTIMENTS), "sequence"), "b": (REGIONS, "sequence")}
    return encoder_with_heads(cfg, heads, 0.0)


def region(record: dict) -> int:
    city = next(w for w, t in zip(record["words"], record["tags"]) if generators.TAGS[t] == "LOC")
    return generators.CITIES.index(city) % REGIONS


@register_task("continual")
class ContinualTask(EncoderTask):
    options_class = ContinualOptions
    metrics = {"loss": False, "a_accuracy": True, "b_accuracy": True, "forgetting": False}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        if cfg.run.max_steps != 2 * self.options.steps_per_task:
            raise ConfigError(f"run.max_steps must be 2 * recipe.options.steps_per_task = "
                              f"{2 * self.options.steps_per_task} (task A, then task B), got {cfg.run.max_steps}")
        data, seed = cfg.data, cfg.run.seed
        self.task_data = {"a": [self.sample(r, "a") for r in generators.reviews(data.num_train, seed)],
                          "b": [self.sample(r, "b") for r in generators.reviews(data.num_train, seed + 17)]}
        held_out = generators.reviews(data.num_eval, seed + 1_000_003)
        self.eval_data = {name: [self.sample(r, name) for r in held_out] for name in ("a", "b")}
        self.eval_samples = self.eval_data["a"]
        self.accuracy_after_a = None
        self.set_phase("a")

    def sample(self, record: dict, head: str) -> dict:
        target = record["label"] if head == "a" else region(record)
        return {"input_ids": encode_words(self.tokenizer, record["words"], self.cfg.data.max_length), "labels": target}

    def set_phase(self, head: str) -> None:
        self.phase = head
        self.train_samples = self.task_data[head]

    def example_losses(self, model: nn.Module, batch: dict, head: str) -> Tensor:
        return cross_entropy(self.cfg, self.forward(model, batch)[head], batch["labels"], reduction="none")

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        return self.example_losses(model, batch, self.phase).sum() / normalizer

    def evaluate(self, model: nn.Module, d) -> dict:
        metrics = {}
        for head in ("a", "b"):
            outputs = predict(model, self, self.eval_data[head], d.device)
            logits = torch.cat([o["logits"][head] for o in outputs])
            labels = torch.cat([o["batch"]["labels"] for o in outputs])
            metrics[f"{head}_accuracy"] = float((logits.argmax(-1) == labels).float().mean())
            if head == self.phase:
                metrics["loss"] = torch.nn.functional.cross_entropy(logits, labels).item()
        if self.accuracy_after_a is not None:
            metrics["forgetting"] = self.accuracy_after_a - metrics["a_accuracy"]
        return metrics

    def callbacks(self) -> list:
        return [*super().callbacks(), EWC(self.options)]


class EWC(Callback):
    """Switches to task B at ``steps_per_task`` (after an eval and the Fisher estimate) and adds the
    EWC penalty during B."""

    def __init__(self, options: ContinualOptions):
        self.options = options
        self.fisher: dict = {}
        self.anchor: dict = {}

    def on_step_begin(self, trainer, step: int) -> None:
        task = trainer.task
        if step < self.options.steps_per_task or task.phase == "b":
            return
        if task.accuracy_after_a is None:
            task.accuracy_after_a = trainer.evaluate()["a_accuracy"]
        if self.options.ewc_lambda > 0:
            self.fisher, self.anchor = diagonal_fisher(trainer, task, self.options.fisher_samples)
        task.set_phase("b")

    def state_dict(self, trainer) -> dict:
        """The phase, A's accuracy, and F and theta* (zeros until task B starts): a run resumed in
        task B keeps the anchor of A's end instead of re-estimating it at the resumed weights."""
        shared = shared_parameters(trainer)
        zeros = {n: torch.zeros_like(p.detach()) for n, p in shared.items()}
        return {"phase": trainer.task.phase, "accuracy_after_a": trainer.task.accuracy_after_a,
                "ewc_active": bool(self.fisher), "fisher": self.fisher or zeros,
                "anchor": self.anchor or {n: z.clone() for n, z in zeros.items()}}

    def load_state_dict(self, trainer, state: dict) -> None:
        trainer.task.accuracy_after_a = state["accuracy_after_a"]
        trainer.task.set_phase(state["phase"])
        if state["ewc_active"]:
            self.fisher, self.anchor = state["fisher"], state["anchor"]

    def extra_loss(self, trainer, model: nn.Module, batch: dict):
        if not self.fisher:
            return None
        params = dict(unwrap(model).named_parameters())
        penalty = sum((self.fisher[n] * (params[n] - self.anchor[n]) ** 2).sum() for n in self.fisher)
        return self.options.ewc_lambda / 2 * penalty


def shared_parameters(trainer) -> dict:
    """The trainable weights both tasks use (everything but the heads), by name."""
    return {n: p for n, p in unwrap(trainer.model).named_parameters() if p.requires_grad and not n.startswith("heads.")}


def diagonal_fisher(trainer, task: ContinualTask, samples: int) -> tuple[dict, dict]:
    """(F, theta*) over the shared weights: F_i = mean over examples of (d log p(y | x) / d theta_i)^2
    with y the true label (the empirical Fisher), one example per backward pass."""
    model = unwrap(trainer.model)
    shared = shared_parameters(trainer)
    fisher = {n: torch.zeros_like(p) for n, p in shared.items()}
    was_training = model.training
    model.eval()
    chosen = task.task_data["a"][:samples]
    for sample in chosen:
        batch = {k: v.to(trainer.d.device) for k, v in task.collate([sample]).items()}
        grads = torch.autograd.grad(task.example_losses(model, batch, "a").sum(), list(shared.values()),
                                    allow_unused=True)
        for (n, _), g in zip(shared.items(), grads):
            if g is not None:
                fisher[n] += g.detach() ** 2 / len(chosen)
    model.train(was_training)
    return fisher, {n: p.detach().clone() for n, p in shared.items()}
