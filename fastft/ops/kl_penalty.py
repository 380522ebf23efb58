"""fastft.ops.kl_penalty: TRL's per-token KL estimators from the sampled tokens' log-probs.

Elementwise, so plain torch (fastft.reference.kl): autograd gives gradients to both inputs, and
torch.compile fuses it with its neighbours (a custom op would be a fusion barrier). Registered so that
``fastft info`` lists it and the generic tests cover it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import kl as _reference
from . import registry
from ._checks import check_float_tensor, check_mask, check_reduction, check_same_device

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


def _truth(logprobs, ref_logprobs, *, estimator="k3", mask=None, reduction="none"):
    d = logprobs - ref_logprobs
    per_token = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) + d - 1, "abs": d.abs()}[estimator]
    return registry.masked_reduction(per_token, mask, reduction)


def _samples(dtype, device):
    lp = (-torch.rand(3, 7, device=device) * 4).to(dtype).requires_grad_()
    rp = (-torch.rand(3, 7, device=device) * 4).to(dtype).requires_grad_()
    mask = torch.rand(3, 7, device=device) > 0.3
    return [registry.Sample((lp, rp), {"estimator": e, "mask": mask, "reduction": r}, f"{e}/{r}")
            for e, r in (("k1", "none"), ("k2", "sum"), ("k3", "mean"), ("abs", "none"))]


def _bad_inputs(device):
    a = torch.randn(3, 5, device=device)
    bad = registry.BadInput
    return [
        bad((a, a), {"estimator": "k4"}, ValueError, "estimator must be one of"),
        bad((a, a[:2]), {}, ValueError, "same shape"),
        bad((a, a), {"mask": torch.ones(3, dtype=torch.bool, device=device)}, ValueError, "mask shape"),
        bad((a, a), {"reduction": "batchmean"}, ValueError, "reduction must be one of"),
        bad((a, a.to("meta")), {}, ValueError, "ref_logprobs is on meta"),
    ]


registry.register(registry.OpEntry(
    name="kl_penalty", functional=kl_penalty, op=None, samples=_samples, truth=_truth, bad_inputs=_bad_inputs,
    benchmark=None,
))
