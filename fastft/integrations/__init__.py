"""Integrations with other libraries: ``causal_lm_loss`` (a Hugging Face causal LM's loss through fastft's
fused linear cross-entropy), ``fused_head`` (any function of the output layer's operands, computed inside
the model's forward: FSDP2-sharded and LoRA'd heads), ``patch`` (``fastft.patch(model)``: loss, LoRA and layers of a live model),
``trl`` (TRL's log-prob computations and SFT metrics) and ``hf_trainer`` (``FastftCallback``: one switch for
transformers' Trainer and TRL's trainers). Submodules are imported on first use."""
import importlib

_SUBMODULES = ("causal_lm_loss", "fused_head", "patch", "trl", "hf_trainer")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
