"""Triton pieces of the fused linear cross-entropy (fastft.ops.linear_cross_entropy).

No new kernel: the cross-entropy forward kernel of kernels/cross_entropy.py already computes the
row loss, the logsumexp and the scaled logit gradient in one program per row. Per row it finishes
reading the logits (first sweep, plus the target logit) before its second sweep reads each block
once and then stores that block's gradient, so the gradient may overwrite the logits it came
from. This launcher runs it that way: the chunk of logits becomes its own gradient, and the linear
cross-entropy needs one [chunk x vocab] buffer instead of two.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .cross_entropy import (
    _bf16_by_hand,
    _check_logits,
    _cross_entropy_fwd_kernel,
    _device_ctx,
    _row_config,
)

__all__ = ["cross_entropy_fwd_inplace"]


def cross_entropy_fwd_inplace(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    grad_scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Like ``cross_entropy_fwd(..., grad_scale, ...)`` but the gradient is written over ``logits``
    (which must be contiguous) and returned as the third output, which *is* ``logits``."""
    n, v = _check_logits(logits, target, "cross_entropy_fwd_inplace")
    if not logits.is_contiguous():
        raise ValueError("cross_entropy_fwd_inplace: logits must be contiguous (the gradient rows are stored densely)")
    device = logits.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return loss, lse, logits
    target = target.contiguous()
    has_weight = weight is not None
    w = weight.to(torch.float32).contiguous() if has_weight else loss  # placeholder, never read
    scale = grad_scale.reshape(()).to(torch.float32)
    block, num_warps = _row_config(v, device)
    with _device_ctx(logits):
        _cross_entropy_fwd_kernel[(n,)](
            logits, logits.stride(0), target, w, scale,
            loss, lse, logits,
            v, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
            HAS_WEIGHT=has_weight,
            HAS_SMOOTHING=float(label_smoothing) > 0.0,
            HAS_Z_LOSS=float(z_loss) > 0.0,
            HAS_SOFTCAP=float(softcap) > 0.0,
            RETURN_GRAD=True,
            BF16_RNE_BY_HAND=_bf16_by_hand(logits),
            BLOCK=block,
            num_warps=num_warps,
        )
    return loss, lse, logits
