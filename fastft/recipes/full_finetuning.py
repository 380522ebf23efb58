"""Full fine-tuning of a causal LM: every weight trains, pretrained layers with a lower learning rate
(layer-wise decay, lowest at the embeddings), and optional gradual unfreezing from the top.

    fastft train recipes/full_finetuning.toml

The data, loss and metrics are the instruction-tuning task's (``causal_lm``: response-only next-token
loss through fastft's fused linear cross-entropy head, eval loss and exact match); ``lora.enabled``
must be false. Parameter groups (Howard & Ruder 2018's discriminative fine-tuning): the output head
and final norm get ``optim.lr``, block i of L gets ``optim.lr * layer_lr_decay ** (L - i)``, the
embeddings ``optim.lr * layer_lr_decay ** (L + 1)``; the schedule scales every group alike. Gradual
unfreezing (``unfreeze_every = N``): the head trains alone for N steps, then one more block from the
top every N steps, the embeddings last; frozen groups get no gradient at all (requires_grad off), so
the unfrozen ones start from fresh optimizer state. It is a pure function of the step, so resuming
keeps it; it needs one process (DDP cannot change the set of trained parameters mid-run).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fastft.runtime.config import ConfigError
from fastft.runtime.models import transformer_blocks
from fastft.runtime.parallel import unwrap
from fastft.runtime.tasks import CausalLMTask, register_task
from fastft.runtime.trainer import Callback

from .common import Monitor, recipe_options


@dataclass(frozen=True)
class FullFinetuningOptions:
    layer_lr_decay: float = 0.8   # 1.0: one learning rate for every layer
    unfreeze_every: int = 0       # steps per unfrozen layer group, top-down (0: everything trains from step 0)

    def validate(self) -> None:
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"recipe.options.layer_lr_decay must be in (0, 1], got {self.layer_lr_decay!r}")
        if self.unfreeze_every < 0:
            raise ConfigError(f"recipe.options.unfreeze_every must be >= 0, got {self.unfreeze_every!r}")


def layer_groups(model: nn.Module) -> list[tuple[str, list]]:
    """(name, parameters) from the top: "head" (everything outside the blocks and the input embeddings:
    final norm, lm_head, a tied head's shared weight), then "block.<L-1>" ... "block.0", then "embeddings"."""
    model = unwrap(model)
    blocks = transformer_blocks(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owner: dict[int, str] = {}
    if output is not None:
        for p in output.parameters():
            owner[id(p)] = "head"  # a tied weight trains at the head's rate
    for i, block in enumerate(blocks):
        for p in block.parameters():
            owner.setdefault(id(p), f"block.{i}")
    if embeddings is not None:
        for p in embeddings.parameters():
            owner.setdefault(id(p), "embeddings")
    order = ["head"] + [f"block.{i}" for i in reversed(range(len(blocks)))] + ["embeddings"]
    groups: dict[str, list] = {name: [] for name in order}
    for p in model.parameters():
        groups[owner.get(id(p), "head")].append(p)
    return [(name, params) for name, params in groups.items() if params]


@register_task("full_finetuning")
class FullFinetuningTask(CausalLMTask):
    def __init__(self, cfg, tokenizer):
        if cfg.lora.enabled:
            raise ConfigError("the full_finetuning task trains every weight: set lora.enabled = false")
        super().__init__(cfg, tokenizer)
        self.options = recipe_options(FullFinetuningOptions, cfg)

    def param_groups(self, model: nn.Module, params: list) -> list:
        trainable = {id(p) for p in params}
        out = []
        for position, (name, group) in enumerate(layer_groups(model)):
            scale = self.options.layer_lr_decay ** position  # head 1, top block decay, ..., embeddings lowest
            chosen = [p for p in group if id(p) in trainable]
            if chosen:
                out.append({"params": chosen, "lr": self.cfg.optim.lr * scale, "name": name})
        return out

    def callbacks(self) -> list:
        extra = [GradualUnfreezing(self.options.unfreeze_every)] if self.options.unfreeze_every else []
        return [Monitor(), *extra]


class GradualUnfreezing(Callback):
    """Layer groups from the top become trainable one by one, every ``every`` steps."""

    def __init__(self, every: int):
        self.every = every
        self.groups: list = []

    def on_train_begin(self, trainer) -> None:
        if trainer.d.world > 1:
            raise ConfigError("gradual unfreezing (recipe.options.unfreeze_every) needs a single process")
        self.groups = layer_groups(trainer.model)

    def unfrozen(self, step: int) -> int:
        return min(len(self.groups), 1 + step // self.every)

    def on_step_begin(self, trainer, step: int) -> None:
        count = self.unfrozen(step)
        for i, (_, params) in enumerate(self.groups):
            for p in params:
                p.requires_grad_(i < count)

    def on_log(self, trainer, record: dict) -> None:
        if "loss" in record:
            record["unfrozen_groups"] = self.unfrozen(record["step"] - 1)

    def on_train_end(self, trainer) -> None:
        for _, params in self.groups:
            for p in params:
                p.requires_grad_(True)
