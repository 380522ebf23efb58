"""fastft.ops.kl_penalty: TRL's per-token KL estimators from the sampled tokens' log-probs.

Elementwise, so plain torch (fastft.reference.kl): autograd gives gradients to both inputs, and
torch.compile fuses it with its neighbours (a custom op would be a fusion barrier). Registered so that
``fastft info`` lists it and the generic tests cover it."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ...reference import kl as _reference
from .. import registry
from ..checks import check_float_tensor, check_mask, check_reduction, check_same_device

__all__ = ["kl_penalty", "ESTIMATORS"]

ESTIMATORS = _reference.ESTIMATORS


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    estimator: str = "k3",
    mask: Optional[Tensor] = None,
    reduction: str = "none",
) -> Tensor:
    """Per-token KL estimates from the sampled tokens' log-probs (TRL's estimators), d = logprobs -
    ref_logprobs: "k1" d, "k2" d^2/2, "k3" exp(-d) + d - 1 (computed as expm1(-d) + d: no
    cancellation for small d), "abs" |d|. ``mask`` zeroes tokens; reductions as in :func:`full_kl`."""
    check_float_tensor("logprobs", logprobs)
    check_float_tensor("ref_logprobs", ref_logprobs)
    if tuple(logprobs.shape) != tuple(ref_logprobs.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have "
                         "the same shape")
    check_same_device("logprobs", logprobs, ref_logprobs=ref_logprobs)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    check_reduction(reduction)
    check_mask("mask", mask, tuple(logprobs.shape), logprobs.device)
    return _reference.kl_penalty(logprobs, ref_logprobs, estimator=estimator, mask=mask, reduction=reduction)


registry.register(registry.OpEntry(
    name="kl_penalty", functional=kl_penalty, op=None, benchmark=None,
))
