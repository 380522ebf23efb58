"""fastft: fused kernels for LLM fine-tuning.

Layers (nothing imports upward): kernels (Triton, shipped as fastft.kernels) / csrc (C++, CUDA:
fastft._C) / fastft.reference  →  fastft.ops (registered ops + dispatch)  →  fastft.nn  →
fastft.lora, fastft.bottleneck, fastft.prefix, fastft.integrations, fastft.runtime.

Every public module is an attribute of ``fastft`` after ``import fastft``. The model-level ones are
imported on first use (module ``__getattr__``), so ``import fastft`` stays light and brings in neither
transformers nor peft; ``fastft.adapters`` is the deprecated old name of ``fastft.bottleneck``.
"""
import importlib

from . import backend, nn, ops, reference
from .ops import cross_entropy

__version__ = "0.1.0"

_LAZY_MODULES = ("bottleneck", "integrations", "lora", "prefix", "recipes", "runtime", "adapters")

__all__ = ["backend", "bottleneck", "cross_entropy", "integrations", "lora", "nn", "ops", "prefix", "recipes",
           "reference", "runtime", "__version__"]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)  # also sets it as an attribute of fastft
    if name in ("patch", "AutoModelForCausalLM"):  # fastft.patch(model), fastft.AutoModelForCausalLM
        return getattr(importlib.import_module(".integrations.patch", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) - {"adapters"})
