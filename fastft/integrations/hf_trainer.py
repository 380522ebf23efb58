"""One switch for transformers' ``Trainer`` and TRL's trainers: ``FastftCallback``.

    from fastft.integrations.hf_trainer import FastftCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[FastftCallback()])
    trainer = trl.SFTTrainer(model=model, args=sft_config, train_dataset=data, peft_config=lora,
                             callbacks=[FastftCallback()])
    trainer.train()

What it does at ``on_train_begin`` -- after PEFT wrapped the model (``peft_config=``), TRL put its fused LM
head on it and accelerate prepared it -- on the model the trainer trains:

* ``fastft.patch(model, **patch_options)``: the loss, every PEFT LoRA layer, RMSNorm / SwiGLU. On a model
  patched already it patches what is new (a repeat ``fastft.patch`` does that), so a model loaded with
  ``fastft.AutoModelForCausalLM`` and wrapped by PEFT afterwards ends with every LoRA layer fused. Patching
  last, over the trainer's own wrappers, lets ``undo()`` restore them exactly (patching at ``__init__`` would
  sit under TRL's head wrapper, which undo could not keep). So an ``evaluate()`` before the first ``train()``
  runs stock; call ``fastft.patch(trainer.model)`` first if it should not.
* when TRL is imported: ``fastft.integrations.trl.patch()``, which routes TRL's fused LM head through
  fastft's chunked heads -- SFTTrainer's loss and its ``entropy`` / ``mean_token_accuracy`` metrics and GRPO's
  policy pass (``fastft.ops.linear_selective_log_softmax``: the entropy differentiable, so GRPO's entropy bonus
  trains), reference-model log-probs of DPO / GRPO / KTO / RLOO (fused linear cross-entropy),
  ``selective_log_softmax``. ``trl_metrics=False`` leaves the calls that ask for the entropy to TRL.

The report of what was patched is ``callback.handle.report`` (the model's) and ``callback.trl_handle.report()``
(TRL's calls, counted); ``verbose=True`` prints the model's. ``callback.undo()`` restores both. The patches
stay on after training, so an ``evaluate()`` after ``train()`` is fused as well.
"""
from __future__ import annotations

import inspect
import logging
import sys
from typing import Optional

from torch import nn
from transformers import TrainerCallback

from .patch import PatchHandle, patch

__all__ = ["FastftCallback"]

logger = logging.getLogger(__name__)


class FastftCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that patches the trained model with fastft (see the module docstring).
    ``patch_options``: the keyword arguments of :func:`fastft.patch` (``loss``, ``lora``, ``layers``, ``check``,
    ``return_logits``, ...). ``trl``: route TRL's head (None: when ``trl`` is imported). ``trl_metrics``: also the
    calls asking for entropy / top-1 (SFTTrainer's loss)."""

    def __init__(self, *, trl: Optional[bool] = None, trl_metrics: bool = True, verbose: bool = False,
                 **patch_options) -> None:
        known = set(inspect.signature(patch).parameters) - {"model", "verbose"}
        unknown = sorted(set(patch_options) - known)
        if unknown:  # checked now, not at train begin
            raise TypeError(f"FastftCallback got unknown fastft.patch options {unknown}; known: {sorted(known)}")
        self.trl = trl
        self.trl_metrics = trl_metrics
        self.verbose = verbose
        self.patch_options = patch_options
        self.handle: Optional[PatchHandle] = None
        self.trl_handle = None

    def on_train_begin(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        self._patch(model)

    def _patch(self, model: Optional[nn.Module]) -> None:
        if model is None:
            raise ValueError("FastftCallback got no model from the trainer at train begin")
        self.handle = patch(model, **self.patch_options)
        if self.handle.latest.entries:
            logger.info("FastftCallback: %s", self.handle.latest)
            if self.verbose:
                print(self.handle.latest)
        use_trl = self.trl if self.trl is not None else "trl" in sys.modules
        if use_trl and self.trl_handle is None:
            from . import trl as fastft_trl

            self.trl_handle = fastft_trl.patch(metrics=self.trl_metrics)

    def undo(self) -> None:
        """Restore the model and TRL as they were before the callback patched them."""
        if self.handle is not None:
            self.handle.undo()
            self.handle = None
        if self.trl_handle is not None:
            self.trl_handle.undo()
            self.trl_handle = None
