"""fastft.ops.linear_full_kl: full_kl of two linear heads' logits, never holding either [N, V] logits (with
``reverse_weight``, both KL directions from the same GEMMs and kernel sweep).

Per token chunk: two GEMMs into chunk logits, the full_kl kernel with its fused gradient (reduction
mean/sum), and the GEMMs into grad_hidden / grad_weight of each head (fastft.ops._losses.HeadGrads, the
engine linear_cross_entropy uses, with the same chunk policy, fastft.ops._losses.chunk_rows). Masked
tokens: on CPU they are dropped before the GEMMs; on CUDA (where finding them is a host sync) every row
is computed and the kernel's mask skips them. Reduction "none" saves the row statistics and recomputes the
logits chunk by chunk in backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...reference import kl as _reference
from .. import registry
from ..checks import (check_chunk_size, check_float_tensor, check_mask, check_number, check_reduction, check_same_device,
                      flat_token_mask)
from .._define import accumulator_dtype, define_op, save_fused_grads, scale_fused_grads, standard_backends
from .._losses import (HeadGrads, autocast_operands, chunk_rows, count_reduction_scale, counted_rows,
                      kl_extension_kernels, kl_triton_kernels, scale_in_place, scatter_rows)
from .full_kl import KLOptions, mix_kl_directions

__all__ = ["linear_full_kl", "LinearKLOptions"]


@dataclass(frozen=True)
class LinearKLOptions(KLOptions):
    chunk_size: int = 0  # token rows per chunk; 0 = from the byte budget


def _run_chunks(hp, wp, hr, wr, mask, options, backend, needs, grad_scale=None, row_grad=None, stats=None):
    """Forward (``row_grad`` None): (kl, lse_p, lse_r, kl_rev) rows (kl_rev empty unless reverse_weight > 0) and,
    with ``grad_scale``, the four gradients. Backward (``row_grad`` [N] and ``stats`` = forward's four): the four
    gradients."""
    n = hp.shape[0]
    has_rev = options.reverse_weight > 0
    idx = counted_rows(mask)
    if idx is not None:
        pick = (lambda t: t if t is None or t.shape[0] != n else t.index_select(0, idx))  # kl_rev may be (0,)
        sub_stats = None if stats is None else tuple(pick(s) for s in stats)
        out_stats, grads = _run_chunks(pick(hp), wp, pick(hr), wr, None, options, backend, needs, grad_scale,
                                       pick(row_grad), sub_stats)
        out_stats = tuple(scatter_rows(s, idx, n) if s.numel() else s for s in out_stats)
        if grads is not None:
            grads = (scatter_rows(grads[0], idx, n) if needs[0] else grads[0], grads[1],
                     scatter_rows(grads[2], idx, n) if needs[2] else grads[2], grads[3])
        return out_stats, grads
    k = linear_full_kl_op.kernels(backend)
    v = wp.shape[0]
    want_grads = grad_scale is not None or row_grad is not None
    grad_p, grad_r = needs[0] or needs[1], needs[2] or needs[3]
    buffers = 2 + (int(grad_p) + int(grad_r) if want_grads else 0)
    step = chunk_rows(max(n, 1), v, hp.dtype, hp.device.type, buffers, options.chunk_size)
    sinks = (HeadGrads(hp, wp, None, needs[0], needs[1], False),
             HeadGrads(hr, wr, None, needs[2], needs[3], False)) if want_grads else None
    acc = accumulator_dtype(hp.dtype)
    if stats is None:
        out_stats = tuple(torch.zeros((n if i < 3 or has_rev else 0,), dtype=acc, device=hp.device) for i in range(4))
    else:
        out_stats = stats
    for start in range(0, n, step):
        end = min(start + step, n)
        lp = hp[start:end] @ wp.t()
        lr = hr[start:end] @ wr.t()
        m = None if mask is None else mask[start:end]
        if row_grad is None:
            chunk_stats = k.kl_fwd(lp, lr, m, grad_scale, options.temperature, grad_p and want_grads,
                                   grad_r and want_grads, options.reverse_weight)
            gp, gr = chunk_stats[4:]
            for dst, src in zip(out_stats[:4 if has_rev else 3], chunk_stats[:4]):
                dst[start:end] = src
            del chunk_stats
        else:
            kl_s, lp_s, lr_s, kl_rev_s = (s[start:end] if s.numel() else None for s in stats)
            gp, gr = k.kl_bwd(row_grad[start:end], lp, lr, m, lp_s, lr_s, kl_s, options.temperature, grad_p, grad_r,
                              kl_rev_s, options.reverse_weight)
        del lp, lr
        if want_grads:
            if grad_p:
                sinks[0].add(start, end, hp[start:end], gp)
            if grad_r:
                sinks[1].add(start, end, hr[start:end], gr)
        # Drop the chunk's gradients before the next kernel call: the C++ kernel then hands the same
        # cached buffers out again instead of page-faulting fresh ones.
        del gp, gr
    if not want_grads:
        return out_stats, None
    gxp, gwp, _ = sinks[0].finish(hp)
    gxr, gwr, _ = sinks[1].finish(hr)
    return out_stats, (gxp, gwp, gxr, gwr)


def _fused(options: LinearKLOptions, needs) -> bool:
    return options.reduction != "none" and any(needs)


def _forward(hp: Tensor, wp: Tensor, hr: Tensor, wr: Tensor, mask: Optional[Tensor], needs: list[bool],
             options: LinearKLOptions, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                             Tensor, Tensor]:
    n = hp.shape[0]
    scale = count_reduction_scale(mask, n, options.reduction, accumulator_dtype(hp.dtype), hp.device)
    fused = _fused(options, needs)
    (kl, lse_p, lse_r, kl_rev), grads = _run_chunks(hp, wp, hr, wr, mask, options, backend, needs,
                                                    grad_scale=scale if fused else None)
    if grads is None:
        grads = tuple(hp.new_empty((0,)) for _ in range(4))
    row_loss = mix_kl_directions(kl, kl_rev, options.reverse_weight)
    loss = row_loss.to(hp.dtype, copy=True) if options.reduction == "none" else (row_loss.sum() * scale).to(hp.dtype)
    return loss, kl, lse_p, lse_r, kl_rev, *grads


def _grads_fake(like, needs):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip(like, needs))


def _fake(hp, wp, hr, wr, mask, needs, options, backend):
    n = hp.shape[0]
    loss = hp.new_empty((n,) if options.reduction == "none" else ())
    acc = accumulator_dtype(hp.dtype)
    stats = [hp.new_empty((n,), dtype=acc) for _ in range(3)]
    kl_rev = hp.new_empty((n,) if options.reverse_weight > 0 else (0,), dtype=acc)
    fused = _fused(options, needs)
    return loss, *stats, kl_rev, *_grads_fake((hp, wp, hr, wr), [fused and need for need in needs])


def _backward_impl(row_grad: Tensor, hp: Tensor, wp: Tensor, hr: Tensor, wr: Tensor, mask: Optional[Tensor],
                   kl: Tensor, lse_p: Tensor, lse_r: Tensor, kl_rev: Tensor, needs: list[bool],
                   options: LinearKLOptions, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, grads = _run_chunks(hp, wp, hr, wr, mask, options, backend, needs, row_grad=row_grad.to(kl.dtype).contiguous(),
                           stats=(kl, lse_p, lse_r, kl_rev))
    return grads


def _backward_fake(row_grad, hp, wp, hr, wr, mask, kl, lse_p, lse_r, kl_rev, needs, options, backend):
    return _grads_fake((hp, wp, hr, wr), needs)


def _setup(ctx, inputs, outputs):
    hp, wp, hr, wr, mask, needs = inputs
    ctx.needs = list(needs)
    ctx.fused = _fused(ctx.options, needs)
    if ctx.fused:
        save_fused_grads(ctx, *outputs[5:])
    else:
        ctx.save_for_backward(hp, wp, hr, wr, mask, *outputs[1:5])


def _backward(ctx, grad_loss):
    needs = ctx.needs
    if ctx.fused:
        grads = scale_fused_grads(ctx, grad_loss, scale_in_place(linear_full_kl_op.kernels(ctx.backend).scale_),
                                  wanted=needs)
    elif not any(needs):
        grads = [None] * 4
    else:
        hp, wp, hr, wr, mask, kl, lse_p, lse_r, kl_rev = ctx.saved_tensors
        if ctx.options.reduction != "none":
            scale = count_reduction_scale(mask, hp.shape[0], ctx.options.reduction, kl.dtype, kl.device)
            grad_loss = (grad_loss.to(kl.dtype) * scale).expand(hp.shape[0])
        grads = ctx.run_backward(grad_loss, hp, wp, hr, wr, mask, kl, lse_p, lse_r, kl_rev, needs)
        grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None)


def _reference_ignoring_chunks(*args, chunk_size=None, **kwargs):
    """The "reference" backend: fastft.reference.kl.linear_full_kl (whole logits, plain autograd; no chunks)."""
    return _reference.linear_full_kl(*args, **kwargs)


linear_full_kl_op = define_op(
    "linear_full_kl", forward=_forward, fake=_fake, setup=_setup, backward=_backward, backward_impl=_backward_impl,
    backward_fake=_backward_fake, options=LinearKLOptions,
    reference=_reference_ignoring_chunks, backends=standard_backends(kl_extension_kernels, kl_triton_kernels),
)


def linear_full_kl(
    policy_hidden: Tensor,
    policy_weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    *,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    reverse_weight: float = 0.0,
) -> Tensor:
    """``full_kl(policy_hidden @ policy_weight.T, ref_hidden @ ref_weight.T, ...)`` computed in token
    chunks, never holding either [N, V] logits: per chunk two GEMMs, the full_kl kernel with its
    fused gradient, and the GEMMs into grad_hidden / grad_weight. Masked tokens are skipped (on CPU no
    GEMM at all). Gradients to every input that requires grad (usually the policy's hidden states and
    head). ``chunk_size`` (token rows) overrides the automatic choice. ``reverse_weight`` w in [0, 1]: per token
    (1 - w) KL(pi || pi_ref) + w KL(pi_ref || pi) from the same GEMMs and kernel sweep (as full_kl's). The hidden sizes of the two models
    may differ; ref tensors of another floating dtype are cast to the policy's."""
    for t, name in ((policy_hidden, "policy_hidden"), (policy_weight, "policy_weight"), (ref_hidden, "ref_hidden"),
                    (ref_weight, "ref_weight")):
        check_float_tensor(name, t)
    check_same_device("policy_hidden", policy_hidden, policy_weight=policy_weight, ref_hidden=ref_hidden,
                      ref_weight=ref_weight)
    if policy_weight.dim() != 2 or ref_weight.dim() != 2:
        raise ValueError(f"the weights must be [V, H] matrices, got {tuple(policy_weight.shape)} and "
                         f"{tuple(ref_weight.shape)}")
    if policy_weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(f"vocabulary sizes differ: policy_weight has {policy_weight.shape[0]} rows and ref_weight "
                         f"{ref_weight.shape[0]}")
    if policy_hidden.dim() == 0 or policy_hidden.shape[-1] != policy_weight.shape[1]:
        raise ValueError(f"policy_hidden {tuple(policy_hidden.shape)} must end in the head's hidden size "
                         f"{policy_weight.shape[1]} (policy_weight {tuple(policy_weight.shape)})")
    if ref_hidden.dim() == 0 or ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(f"ref_hidden {tuple(ref_hidden.shape)} must end in the head's hidden size "
                         f"{ref_weight.shape[1]} (ref_weight {tuple(ref_weight.shape)})")
    if tuple(policy_hidden.shape[:-1]) != tuple(ref_hidden.shape[:-1]):
        raise ValueError(f"policy_hidden {tuple(policy_hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} must "
                         "have the same token shape")
    if policy_weight.shape[0] == 0:
        raise ValueError("the heads have a vocabulary of size 0")
    check_chunk_size(chunk_size)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    check_reduction(reduction)
    reverse_weight = check_number("reverse_weight", reverse_weight, low=0.0, high=1.0)
    check_mask("mask", mask, tuple(policy_hidden.shape[:-1]), policy_hidden.device)
    # under autocast the four GEMM operands take its dtype, as F.linear's would, and the loss is fp32
    policy_hidden, policy_weight, ref_hidden, ref_weight, autocast_dtype = autocast_operands(
        policy_hidden, policy_weight, ref_hidden, ref_weight)
    dtype = policy_hidden.dtype
    policy_weight, ref_hidden, ref_weight = (t.to(dtype) for t in (policy_weight, ref_hidden, ref_weight))
    loss = linear_full_kl_op.dispatch(_run_kernels, policy_hidden, policy_weight, ref_hidden, ref_weight, mask=mask,
                                      temperature=temperature, reduction=reduction, chunk_size=chunk_size,
                                      reverse_weight=reverse_weight)
    return loss.to(autocast_dtype) if autocast_dtype is not None else loss


def _run_kernels(backend, policy_hidden, policy_weight, ref_hidden, ref_weight, *, mask, temperature, reduction,
                 chunk_size, reverse_weight):
    grad_on = torch.is_grad_enabled()
    ins = (policy_hidden.reshape(-1, policy_hidden.shape[-1]), policy_weight,
           ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight)
    needs = [bool(grad_on and t.requires_grad) for t in ins]
    ins = tuple(t.contiguous() for t in ins)
    options = LinearKLOptions(temperature=temperature, reduction=reduction, reverse_weight=reverse_weight,
                              chunk_size=int(chunk_size or 0))
    loss = linear_full_kl_op(*ins, flat_token_mask(mask), needs, options=options, backend=backend)[0]
    return loss.reshape(policy_hidden.shape[:-1]) if reduction == "none" else loss


registry.register(registry.OpEntry(
    name="linear_full_kl", functional=linear_full_kl, op=linear_full_kl_op, benchmark="kl",
))
