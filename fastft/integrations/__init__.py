"""Integrations with other libraries: ``fastft.integrations.transformers`` (Hugging Face causal-LM loss
through fastft's fused linear cross-entropy), ``patch`` (``fastft.patch(model)``: loss, LoRA and layers of
a live model) and ``trl`` (TRL's log-prob computations). Submodules are imported on first use."""
import importlib

_SUBMODULES = ("transformers", "patch", "trl")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
