"""fastft: fused kernels for LLM fine-tuning.

Layers (nothing imports upward): kernels (Triton, shipped as fastft.kernels) / csrc (C++, CUDA:
fastft._C) / fastft.reference  →  fastft.ops (registered ops + dispatch)  →  fastft.nn  →
fastft.integrations, fastft.runtime.
"""
from . import backend, ops, nn, reference
from .ops import cross_entropy

__version__ = "0.1.0"
__all__ = ["backend", "ops", "nn", "reference", "cross_entropy", "__version__"]
