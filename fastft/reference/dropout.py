"""The dropout keep-mask of LoRA and the adapter, in plain torch: the test oracle.

Element ``index`` (its flat row-major index into the tensor being dropped: x [N, in] for LoRA, the [N, r]
bottleneck for the adapter) under a 64-bit seed gets 24 random bits (MurmurHash3's 32-bit finalizer, two
rounds over the low and high words of seed and index) and is dropped when they are below
round(p * 2^24); kept elements are scaled by 2^24 / (2^24 - threshold). Written independently of the
copies the kernels use (csrc/_dropout.h, kernels/dropout.py); tests/ops/test_dropout.py checks all agree.
"""
from __future__ import annotations

import torch
from torch import Tensor

DROP_BITS = 24  # a mask element is the top 24 bits of its hash compared with the drop threshold
MIX_MUL1 = 0x85EBCA6B
MIX_MUL2 = 0xC2B2AE35
INDEX_HI_MUL = 0x9E3779B1
_MASK32 = 0xFFFFFFFF


def drop_threshold(p: float) -> int:
    """The integer threshold T of dropout probability p: an element drops when its 24 hash bits < T."""
    return int(round(float(p) * (1 << DROP_BITS)))


def keep_scale(threshold: int) -> float:
    """1 / (1 - T / 2^24): kept elements are scaled so the expectation is unchanged."""
    return float(1 << DROP_BITS) / float((1 << DROP_BITS) - threshold)


def draw_seed(device: torch.device) -> Tensor:
    """A fresh 62-bit seed from the default generator of ``device`` (no host sync on CUDA)."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64, device=device)


def _mul32(h: Tensor, c: int) -> Tensor:
    # (h * c) mod 2^32 for 0 <= h < 2^32 without int64 overflow: split c into 16-bit halves.
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(h: Tensor) -> Tensor:
    # MurmurHash3's 32-bit finalizer, on int64 tensors holding uint32 values.
    h = h ^ (h >> 16)
    h = _mul32(h, MIX_MUL1)
    h = h ^ (h >> 13)
    h = _mul32(h, MIX_MUL2)
    return h ^ (h >> 16)


def dropout_bits(seed: Tensor, index: Tensor) -> Tensor:
    """24 random bits (int64 in [0, 2^24)) per flat ``index`` (int64 >= 0) under ``seed``."""
    seed = seed.to(torch.int64).reshape(())
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    idx_lo, idx_hi = index & _MASK32, (index >> 32) & _MASK32
    h = _mix32(idx_lo ^ seed_lo)
    h = _mix32(h ^ seed_hi ^ _mul32(idx_hi, INDEX_HI_MUL))
    return h >> (32 - DROP_BITS)


def dropout_keep(seed: Tensor, n: int, r: int, threshold: int, device=None) -> Tensor:
    """Boolean [n, r] keep mask of element (i, j) = flat index i * r + j."""
    index = torch.arange(n * r, dtype=torch.int64, device=device if device is not None else seed.device)
    return (dropout_bits(seed, index) >= threshold).reshape(n, r)
