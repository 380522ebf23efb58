"""Bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2021), pure torch.

    y = x + scale * (h @ W_up^T + b_up),   h = dropout(act(x @ W_down^T + b_down))

W_down is [r, H] and W_up is [H, r] (nn.Linear layout). Dropout uses a counter-based mask, the same
function of (seed, flat index into the [N, r] bottleneck) on every backend (see :func:`dropout_keep`),
so the fused kernels and this reference drop the same elements for the same seed, and a backward pass
regenerates the mask instead of storing it. The seed is drawn from torch's default generator of the
input's device, so ``torch.manual_seed`` makes every call reproducible. Math in the input's dtype as
eager torch does (this is also the eager block the benchmark compares against, up to its dropout).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
DROP_BITS = 24  # a mask element is the top 24 bits of its hash compared with the drop threshold
_MASK32 = 0xFFFFFFFF


def activation_fn(name: str, x: Tensor) -> Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACTIVATIONS)}")


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
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_bits(seed: Tensor, index: Tensor) -> Tensor:
    """24 random bits (int64 in [0, 2^24)) per flat ``index`` (int64 >= 0) under ``seed``; the same
    function as ``dropout_bits`` in csrc/cpu/adapter.cpp and ``_dropout_bits`` in kernels/adapter.py."""
    seed = seed.to(torch.int64)
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    idx_lo, idx_hi = index & _MASK32, (index >> 32) & _MASK32
    h = _mix32(idx_lo ^ seed_lo)
    h = _mix32(h ^ seed_hi ^ _mul32(idx_hi, 0x9E3779B1))
    return h >> (32 - DROP_BITS)


def dropout_keep(seed: Tensor, n: int, r: int, threshold: int, device=None) -> Tensor:
    """Boolean [n, r] keep mask of element (i, j) = flat index i * r + j."""
    index = torch.arange(n * r, dtype=torch.int64, device=device if device is not None else seed.device)
    return (dropout_bits(seed, index) >= threshold).reshape(n, r)


def adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Optional[Tensor],
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    *,
    activation: str = "relu",
    dropout_p: float = 0.0,
    training: bool = True,
    scale: float = 1.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """``x + scale * up(dropout(act(down(x))))`` in plain torch autograd. ``seed`` (a 0-dim int64
    tensor) is drawn from the default generator when dropout is active and it is not given."""
    h = activation_fn(activation, F.linear(x, down_weight, down_bias))
    threshold = drop_threshold(dropout_p) if training else 0
    if threshold > 0:
        if seed is None:
            seed = draw_seed(x.device)
        r = h.shape[-1]
        n = h.numel() // r
        keep = dropout_keep(seed, n, r, threshold, device=x.device).reshape(h.shape)
        h = h * keep.to(h.dtype) * keep_scale(threshold)
    return x + scale * F.linear(h, up_weight, up_bias)
