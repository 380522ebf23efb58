"""fastft.ops.full_kl: KL(pi || pi_ref) over the whole vocabulary, per token (RLHF penalties, distillation), or
with ``reverse_weight`` w the mix (1 - w) KL(pi || pi_ref) + w KL(pi_ref || pi) from the same single pass.

Data flow (reduction "mean"/"sum", gradients wanted): one kernel per row reads both rows once from
memory and writes KL and d(loss)/d(logits) already scaled by the reduction (1/counted tokens for
"mean"); backward only multiplies by the upstream gradient, and skips even that when it is exactly 1
(the usual ``loss.backward()``), as fastft.ops.cross_entropy does. For reduction "none" forward saves
both rows' logsumexps and the KL (and KL(rho || pi) when w > 0), and backward writes the gradient in one sweep. Masked tokens are never
read: their KL and gradient are 0.

Kernels (same signature on every backend; "cpp"/"cuda" are torch.ops.fastft.* from csrc/cpu/kl.cpp and
its CUDA twin, "triton" is fastft.kernels.kl, "reference" is fastft.reference.kl with plain autograd):
  full_kl_fwd(policy[N,V], ref[N,V], mask[N] bool?, grad_scale[] f32?, temperature, grad_policy, grad_ref,
              reverse_weight) -> (kl[N], lse_p[N], lse_r[N] f32, kl_rev[N] f32 | (0,), grad_policy[N,V] | (0,),
                                  grad_ref[N,V] | (0,))
  full_kl_bwd(grad_kl[N] f32, policy, ref, mask?, lse_p, lse_r, kl, temperature, grad_policy, grad_ref,
              kl_rev?, reverse_weight) -> (grad_policy | (0,), grad_ref | (0,))
  kl = KL(pi || rho), kl_rev = KL(rho || pi) per row (computed only when reverse_weight > 0); the fused gradients
  are those of the weighted row loss (mix_kl_directions).
  (f32 is fp64 for fp64 logits on the C++ backend, the only one that takes fp64.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...reference import kl as _reference
from .. import registry
from ..checks import (check_float_tensor, check_mask, check_number, check_reduction, check_same_device,
                      flat_token_mask, rows)
from .._define import accumulator_dtype, define_op, save_fused_grads, scale_fused_grads, standard_backends
from .._losses import count_reduction_scale, kl_extension_kernels, kl_triton_kernels, scale_in_place

__all__ = ["full_kl", "KLOptions", "mix_kl_directions"]


@dataclass(frozen=True)
class KLOptions:
    temperature: float = 1.0
    reduction: str = "mean"
    reverse_weight: float = 0.0  # w: the row loss is (1 - w) KL(pi || rho) + w KL(rho || pi)


def mix_kl_directions(kl: Tensor, kl_rev: Tensor, reverse_weight: float) -> Tensor:
    """(1 - w) kl + w kl_rev per row; a weight-0 direction is left out (its +inf must not become 0 * inf = NaN)."""
    if reverse_weight == 0.0:
        return kl
    if reverse_weight == 1.0:
        return kl_rev
    return (1.0 - reverse_weight) * kl + reverse_weight * kl_rev


def _fused(options: KLOptions, grad_policy: bool, grad_ref: bool) -> bool:
    return options.reduction != "none" and (grad_policy or grad_ref)


def _forward(policy: Tensor, ref: Tensor, mask: Optional[Tensor], grad_policy: bool, grad_ref: bool,
             options: KLOptions, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fused = _fused(options, grad_policy, grad_ref)
    scale = count_reduction_scale(mask, policy.shape[0], options.reduction, accumulator_dtype(policy.dtype),
                                  policy.device)
    kl, lse_p, lse_r, kl_rev, gp, gr = full_kl_op.kernels(backend).kl_fwd(
        policy, ref, mask, scale if fused else None, options.temperature, grad_policy, grad_ref,
        options.reverse_weight)
    row_loss = mix_kl_directions(kl, kl_rev, options.reverse_weight)
    if options.reduction == "none":
        loss = row_loss.to(policy.dtype, copy=True)
    else:
        loss = (row_loss.sum() * scale).to(policy.dtype)
    return loss, kl, lse_p, lse_r, kl_rev, gp, gr


def _fake(policy, ref, mask, grad_policy, grad_ref, options, backend):
    n, v = policy.shape
    fused = _fused(options, grad_policy, grad_ref)
    loss = policy.new_empty((n,) if options.reduction == "none" else ())
    acc = accumulator_dtype(policy.dtype)
    stats = [policy.new_empty((n,), dtype=acc) for _ in range(3)]
    kl_rev = policy.new_empty((n,) if options.reverse_weight > 0 else (0,), dtype=acc)
    gp = policy.new_empty((n, v) if fused and grad_policy else (0,))
    gr = policy.new_empty((n, v) if fused and grad_ref else (0,))
    return loss, *stats, kl_rev, gp, gr


def _backward_impl(grad_kl: Tensor, policy: Tensor, ref: Tensor, mask: Optional[Tensor], lse_p: Tensor,
                   lse_r: Tensor, kl: Tensor, kl_rev: Tensor, grad_policy: bool, grad_ref: bool, options: KLOptions,
                   backend: str) -> tuple[Tensor, Tensor]:
    w = options.reverse_weight
    return full_kl_op.kernels(backend).kl_bwd(grad_kl.to(kl.dtype).contiguous(), policy, ref, mask, lse_p, lse_r, kl,
                                              options.temperature, grad_policy, grad_ref, kl_rev if w > 0 else None, w)


def _backward_fake(grad_kl, policy, ref, mask, lse_p, lse_r, kl, kl_rev, grad_policy, grad_ref, options, backend):
    return (policy.new_empty(policy.shape if grad_policy else (0,)),
            policy.new_empty(policy.shape if grad_ref else (0,)))


def _setup(ctx, inputs, outputs):
    policy, ref, mask, grad_policy, grad_ref = inputs
    ctx.flags = (grad_policy, grad_ref)
    ctx.fused = _fused(ctx.options, grad_policy, grad_ref)
    if ctx.fused:
        save_fused_grads(ctx, *outputs[5:])
    else:
        ctx.save_for_backward(policy, ref, mask, *outputs[1:5])


def _backward(ctx, grad_loss):
    grad_policy, grad_ref = ctx.flags
    if ctx.fused:
        gp, gr = scale_fused_grads(ctx, grad_loss, scale_in_place(full_kl_op.kernels(ctx.backend).scale_),
                                   wanted=ctx.flags)
    elif not (grad_policy or grad_ref):
        gp = gr = None
    else:
        policy, ref, mask, kl, lse_p, lse_r, kl_rev = ctx.saved_tensors
        if ctx.options.reduction != "none":
            scale = count_reduction_scale(mask, policy.shape[0], ctx.options.reduction, kl.dtype, kl.device)
            grad_loss = (grad_loss.to(kl.dtype) * scale).expand(policy.shape[0])
        gp, gr = ctx.run_backward(grad_loss, policy, ref, mask, lse_p, lse_r, kl, kl_rev, grad_policy, grad_ref)
    return (gp if grad_policy else None), (gr if grad_ref else None), None, None, None


full_kl_op = define_op(
    "full_kl", forward=_forward, fake=_fake, setup=_setup, backward=_backward, backward_impl=_backward_impl,
    backward_fake=_backward_fake, options=KLOptions,
    reference=_reference.full_kl, backends=standard_backends(kl_extension_kernels, kl_triton_kernels),
)


def full_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    *,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    reverse_weight: float = 0.0,
) -> Tensor:
    """Full-vocabulary KL(pi || pi_ref) per token, pi = softmax(policy_logits / T), pi_ref =
    softmax(ref_logits / T), over the last dimension: sum_v pi_v (log pi_v - log pi_ref_v).

    ``reverse_weight`` w in [0, 1]: per token (1 - w) KL(pi || pi_ref) + w KL(pi_ref || pi), both directions from
    the same single pass over the logits (w = 1: the reverse KL alone; 0, the default: the forward KL alone).

    ``mask`` (shape = the logits' leading shape; True / nonzero = counted) zeroes the other tokens;
    reduction "none" -> per-token KL of the leading shape, "sum", or "mean" over counted tokens (0
    when none is counted). Gradients flow to ``policy_logits`` and, when it requires grad, to
    ``ref_logits``. ``ref_logits`` of another floating dtype are cast to the policy's. Tokens the
    policy gives probability 0 (logit -inf) contribute 0 (to the reverse direction: tokens pi_ref gives 0). The
    result has the policy's dtype.

    Hostile values, on every backend: a token whose logits hold NaN or +inf, or are all -inf, gets KL
    NaN and a NaN policy-gradient row (never a silent finite value); where the policy has mass on a
    token whose reference logit is -inf the KL is +inf (its policy-gradient row is not finite); the reverse
    direction likewise with the roles swapped. Masked tokens are not read.
    """
    check_float_tensor("policy_logits", policy_logits, min_dim=1)
    check_float_tensor("ref_logits", ref_logits)
    if policy_logits.shape[-1] != ref_logits.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: policy_logits has {policy_logits.shape[-1]} and ref_logits "
            f"{ref_logits.shape[-1]} (last dimension)"
        )
    if tuple(policy_logits.shape) != tuple(ref_logits.shape):
        raise ValueError(f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} "
                         "must have the same shape")
    if policy_logits.shape[-1] == 0:
        raise ValueError("the logits have a vocabulary of size 0")
    check_same_device("policy_logits", policy_logits, ref_logits=ref_logits)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    check_reduction(reduction)
    reverse_weight = check_number("reverse_weight", reverse_weight, low=0.0, high=1.0)
    check_mask("mask", mask, tuple(policy_logits.shape[:-1]), policy_logits.device)
    if ref_logits.dtype != policy_logits.dtype:
        ref_logits = ref_logits.to(policy_logits.dtype)
    return full_kl_op.dispatch(_run_kernels, policy_logits, ref_logits, mask=mask, temperature=temperature,
                               reduction=reduction, reverse_weight=reverse_weight)


def _run_kernels(backend, policy_logits, ref_logits, *, mask, temperature, reduction, reverse_weight):
    token_shape = tuple(policy_logits.shape[:-1])
    flat_mask = flat_token_mask(mask)
    v = policy_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    loss = full_kl_op(rows(policy_logits, v), rows(ref_logits, v), flat_mask, grad_on and policy_logits.requires_grad,
                      grad_on and ref_logits.requires_grad,
                      options=KLOptions(temperature, reduction, reverse_weight),
                      backend=backend)[0]
    return loss.reshape(token_shape) if reduction == "none" else loss


registry.register(registry.OpEntry(
    name="full_kl", functional=full_kl, op=full_kl_op, benchmark="kl",
))
