"""fastft.nn.KLPenalty: the per-token KL penalty of PPO / GRPO as a module."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.checks import check_number, check_reduction
from ..ops.defs.kl_penalty import ESTIMATORS, kl_penalty


class KLPenalty(nn.Module):
    """``coef * kl_penalty(logprobs, ref_logprobs, estimator=..., mask=..., reduction=...)``.

    With the default ``reduction="none"`` it gives the per-token penalty PPO subtracts from its
    rewards (``rewards = scores - KLPenalty(0.05, "k1")(logprobs, ref_logprobs)``) or GRPO adds to
    its per-token loss (``beta * k3``). See :func:`fastft.ops.kl_penalty` for the estimators.
    """

    def __init__(self, coef: float, estimator: str = "k3", reduction: str = "none") -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.reduction = check_reduction(reduction)
        if isinstance(coef, Tensor) and coef.numel() == 1:  # a scheduler's beta as a tensor: taken by value
            coef = coef.item()
        self.coef = check_number("coef", coef)
        self.estimator = estimator

    def forward(self, logprobs: Tensor, ref_logprobs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        kl = kl_penalty(logprobs, ref_logprobs, estimator=self.estimator, mask=mask, reduction=self.reduction)
        return kl if self.coef == 1.0 else self.coef * kl

    def extra_repr(self) -> str:
        return f"coef={self.coef}, estimator={self.estimator!r}, reduction={self.reduction!r}"
