"""Bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2021), pure torch.

    y = x + scale * (h @ W_up^T + b_up),   h = dropout(act(x @ W_down^T + b_down))

W_down is [r, H] and W_up is [H, r] (nn.Linear layout). Dropout uses a counter-based mask, the same
function of (seed, flat index into the [N, r] bottleneck) on every backend (see fastft/reference/dropout.py),
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

# The dropout mask lives in .dropout (shared with the LoRA reference); re-exported here for callers of this module.
from .dropout import DROP_BITS, draw_seed, drop_threshold, dropout_bits, dropout_keep, keep_scale  # noqa: F401

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


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
