"""The dropout keep-mask of the LoRA and adapter kernels, in Triton (for the kernels) and in torch (for the ops).

Element ``index`` (its flat row-major index into the tensor being dropped: x [N, in] for LoRA, the [N, r]
bottleneck for the adapter) under a 64-bit ``seed`` gets 24 random bits

    h = mix32(idx_lo ^ seed_lo);  h = mix32(h ^ seed_hi ^ idx_hi * INDEX_HI_MUL);  bits = h >> (32 - DROP_BITS)

(mix32 = MurmurHash3's 32-bit finalizer) and is dropped when bits < threshold, threshold = round(p * 2^24);
kept elements are scaled by 2^24 / (2^24 - threshold). The same function as csrc/_dropout.h (C++/CUDA)
and fastft/reference/dropout.py (the test oracle); tests/ops/test_dropout.py checks the constants and masks agree.
The torch half of this file needs no Triton (ops import it on machines without one).
"""
from __future__ import annotations

import torch
from torch import Tensor

DROP_BITS = 24
MIX_MUL1 = 0x85EBCA6B
MIX_MUL2 = 0xC2B2AE35
INDEX_HI_MUL = 0x9E3779B1
_MASK32 = 0xFFFFFFFF

__all__ = ["DROP_BITS", "drop_threshold", "keep_scale", "draw_seed", "seed_on", "dropout_bits", "keep_mask"]


def drop_threshold(p: float) -> int:
    """round(p * 2^24): an element drops when its 24 hash bits are below this."""
    return int(round(float(p) * (1 << DROP_BITS)))


def keep_scale(threshold: int) -> float:
    """2^24 / (2^24 - threshold): the factor on kept elements (expectation unchanged)."""
    return float(1 << DROP_BITS) / float((1 << DROP_BITS) - threshold)


def draw_seed(device) -> Tensor:
    """A one-element int64 seed from the default generator of ``device`` (``torch.manual_seed`` reproduces
    it; no host sync on CUDA)."""
    return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=device)


def seed_on(seed: Tensor, like: Tensor) -> Tensor:
    """``seed`` as the one-element int64 tensor on ``like``'s device that a kernel reads: a seed left on the
    host would reach a CUDA kernel as a host pointer. No copy when it is there already; a host seed is copied
    without a host sync."""
    if seed.device != like.device or seed.dtype != torch.int64:
        seed = seed.to(device=like.device, dtype=torch.int64, non_blocking=True)
    return seed.reshape(1)


def _mul32(h: Tensor, c: int) -> Tensor:
    # (h * c) mod 2^32 for 0 <= h < 2^32 in int64 without overflow: c in 16-bit halves.
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32_torch(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, MIX_MUL1)
    h = h ^ (h >> 13)
    h = _mul32(h, MIX_MUL2)
    return h ^ (h >> 16)


def dropout_bits(seed: Tensor, index: Tensor) -> Tensor:
    """The 24 random bits (int64 in [0, 2^24)) of each flat ``index`` (int64 >= 0) under ``seed`` (one element)."""
    seed = seed.reshape(()).to(device=index.device, dtype=torch.int64)
    h = _mix32_torch((index & _MASK32) ^ (seed & _MASK32))
    h = _mix32_torch(h ^ ((seed >> 32) & _MASK32) ^ _mul32((index >> 32) & _MASK32, INDEX_HI_MUL))
    return h >> (32 - DROP_BITS)


def keep_mask(shape, dropout_p: float, seed: Tensor, device=None) -> Tensor:
    """Boolean keep-mask of ``shape`` (element = its flat row-major index) for ``dropout_p`` under ``seed``."""
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    index = torch.arange(numel, dtype=torch.int64, device=device if device is not None else seed.device)
    return (dropout_bits(seed, index) >= drop_threshold(dropout_p)).reshape(shape)


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch half above still serves the ops
    triton = None

if triton is not None:
    _DROP_SHIFT = tl.constexpr(32 - DROP_BITS)
    _MUL1 = tl.constexpr(MIX_MUL1)
    _MUL2 = tl.constexpr(MIX_MUL2)
    _HI_MUL = tl.constexpr(INDEX_HI_MUL)

    @triton.jit
    def mix32(h):
        # MurmurHash3's 32-bit finalizer on uint32 (wrapping multiplies, logical shifts).
        h = h ^ (h >> 16)
        h = h * _MUL1
        h = h ^ (h >> 13)
        h = h * _MUL2
        return h ^ (h >> 16)

    @triton.jit
    def keep(seed, index, threshold):
        """True where flat element ``index`` (int64) is kept under ``seed`` (int64 scalar), threshold an int."""
        seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        idx_lo = (index & 0xFFFFFFFF).to(tl.uint32)
        idx_hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
        h = mix32(idx_lo ^ seed_lo)
        h = mix32(h ^ seed_hi ^ (idx_hi * _HI_MUL))
        return (h >> _DROP_SHIFT).to(tl.int32) >= threshold
