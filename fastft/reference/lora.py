"""LoRA linear in pure torch: the oracle for tests and the fallback backend.

    y = x W^T + b + scaling * (dropout(x) A^T) B^T,     dropout(x) = x * mask / (1 - p)

x [..., in], W [out, in], b [out] or None, A [r, in], B [out, r]. Dropout (p > 0): the keep-mask is
``dropout_mask`` (bool, x's shape) or, given ``seed``, the counter-based mask of fastft/reference/dropout.py
over x's flat [N, in] index (the one every compiled backend draws); kept elements are scaled by
2^24 / (2^24 - round(p * 2^24)), i.e. 1 / (1 - p) up to p's rounding to 24 bits. No mask and no seed:
no dropout. Plain autograd; math in x's dtype unless ``upcast``
(then fp32, or fp64 for fp64 inputs, and the result is cast back).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dropout import drop_threshold, dropout_keep, keep_scale


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    upcast: bool = False,
) -> Tensor:
    if dropout_p > 0 and dropout_mask is None and seed is not None:
        in_features = x.shape[-1]
        dropout_mask = dropout_keep(seed, x.numel() // in_features, in_features, drop_threshold(dropout_p),
                                    device=x.device).reshape(x.shape)
    out_dtype = x.dtype
    if upcast:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, weight, lora_A, lora_B = x.to(acc), weight.to(acc), lora_A.to(acc), lora_B.to(acc)
        bias = bias.to(acc) if bias is not None else None
    y = torch.nn.functional.linear(x, weight, bias)
    x_lora = x
    if dropout_mask is not None:
        x_lora = x * dropout_mask.to(x.dtype) * keep_scale(drop_threshold(dropout_p))
    y = y + scaling * ((x_lora @ lora_A.t()) @ lora_B.t())
    return y.to(out_dtype)


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """scaling * B @ A: what merging adds to W (computed in fp32 for half inputs, as PEFT does on CPU)."""
    acc = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
    return (scaling * (lora_B.to(acc) @ lora_A.to(acc))).to(lora_A.dtype)
