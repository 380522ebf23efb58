"""Linear cross-entropy, the plain way: logits = input @ linear_weight.T (+ linear_bias), then
fastft.reference.cross_entropy over the last dimension. It builds the whole [tokens x vocab]
logits, which is exactly what fastft.ops.linear_cross_entropy avoids; here it is the oracle.

The logits are produced in the input's dtype (as F.linear would), the cross-entropy math runs in
fp32 (fp64 for fp64 input) and the loss has the input's dtype.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .cross_entropy import cross_entropy


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    logits = F.linear(input, linear_weight, linear_bias)
    return cross_entropy(
        logits, target, weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )
