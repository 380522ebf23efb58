"""fastft: fused kernels for LLM fine-tuning.

Layers (nothing imports upward): kernels (Triton, shipped as fastft.kernels) / csrc (C++, CUDA:
fastft._C) / fastft.reference  →  fastft.ops (registered ops + dispatch)  →  fastft.nn  →
fastft.lora, fastft.adapters, fastft.prefix, fastft.integrations, fastft.runtime.
"""
from . import backend, nn, ops, reference
from . import adapters, lora, prefix  # model-level APIs (import transformers/peft only when used)
from .ops import cross_entropy

__version__ = "0.1.0"
__all__ = ["adapters", "backend", "cross_entropy", "lora", "nn", "ops", "prefix", "reference", "__version__"]
