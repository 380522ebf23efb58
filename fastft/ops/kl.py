"""fastft.ops.kl: KL penalties for RLHF (PPO / GRPO) and distillation.

  full_kl(policy_logits, ref_logits)        KL(pi || rho) over the whole vocabulary, per token
  selective_log_softmax(logits, index)      log pi(index) without materializing the log-softmax
  kl_penalty(logprobs, ref_logprobs)        TRL's per-token estimators k1 / k2 / k3 / abs
  linear_full_kl(h_p, W_p, h_r, W_r)        full_kl of the two heads' logits, in token chunks

Data flow of full_kl (reduction "mean"/"sum", gradients wanted): one kernel per row reads both
rows once from memory and writes KL and d(loss)/d(logits) already scaled by the reduction
(1/counted tokens for "mean"); backward only multiplies by the upstream gradient, and skips even
that when it is exactly 1 (the usual ``loss.backward()``), as fastft.ops.cross_entropy does. For
reduction "none" forward saves both rows' logsumexps and the KL, and backward writes the gradient
in one sweep. Masked tokens are never read: their KL and gradient are 0.

Kernels (same signature on every backend; "cpp" is torch.ops.fastft.* from csrc/cpu/kl.cpp,
"triton" is fastft.kernels.kl, "reference" is fastft.reference.kl with plain autograd):
  full_kl_fwd(policy[N,V], ref[N,V], mask[N] bool?, grad_scale[] f32?, temperature, grad_policy, grad_ref)
      -> (kl[N], lse_p[N], lse_r[N] f32, grad_policy[N,V] | (0,), grad_ref[N,V] | (0,))
  full_kl_bwd(grad_kl[N] f32, policy, ref, mask?, lse_p, lse_r, kl, temperature, grad_policy, grad_ref)
      -> (grad_policy | (0,), grad_ref | (0,))
  selective_log_softmax_fwd(logits[N,V], index[N] i64, temperature) -> (logp[N] f32, lse[N] f32)
  selective_log_softmax_bwd(grad_logp[N] f32, logits, index, lse, temperature) -> grad[N,V]
  (f32 is fp64 for fp64 logits on the C++ backend, the only one that takes fp64.)
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import kl as _reference
from .cross_entropy import _is_traced

__all__ = ["full_kl", "selective_log_softmax", "kl_penalty", "linear_full_kl", "ESTIMATORS"]

ESTIMATORS = _reference.ESTIMATORS
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_NONE, _MEAN, _SUM = 0, 1, 2
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUPPORTED = ("reference", "cpp", "triton")


def _kernels(backend: str) -> SimpleNamespace:
    if backend == "triton":
        from ..kernels import cross_entropy as ce
        from ..kernels import kl as k

        return SimpleNamespace(full_fwd=k.full_kl_fwd, full_bwd=k.full_kl_bwd, sel_fwd=k.selective_log_softmax_fwd,
                               sel_bwd=k.selective_log_softmax_bwd, scale_=ce.scale_if_not_one_)
    ops = torch.ops.fastft
    return SimpleNamespace(full_fwd=ops.full_kl_fwd_kernel, full_bwd=ops.full_kl_bwd_kernel,
                           sel_fwd=ops.selective_log_softmax_fwd_kernel, sel_bwd=ops.selective_log_softmax_bwd_kernel,
                           scale_=ops.scale_if_not_one_kernel_)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduction_scale(mask: Optional[Tensor], n: int, reduction: int, dtype: torch.dtype, device) -> Tensor:
    """0-dim factor from the sum of token KLs to the reduced loss (no host sync): 1 for "sum",
    1/counted for "mean", 0 when nothing is counted (an all-masked batch gives 0 and zero grads)."""
    if reduction != _MEAN:
        return torch.ones((), dtype=dtype, device=device)
    count = mask.sum(dtype=dtype) if mask is not None else torch.full((), float(n), dtype=dtype, device=device)
    return torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count))


def _scale_grads_once(ctx, grads: list, grad_loss: Tensor, name: str) -> list:
    """Multiply forward's fused gradients by the upstream gradient: in place in eager (a no-op for
    1.0), a plain multiply while traced."""
    if any(g is not None and _is_traced(g) for g in grads):
        return [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
    if ctx.grad_consumed:
        raise RuntimeError(
            f"fastft.{name}: backward ran twice through the same loss (retain_graph=True); the fused gradient "
            "buffers are scaled in place by the first backward. Recompute the loss instead."
        )
    ctx.grad_consumed = True
    scale_ = _kernels(ctx.backend).scale_
    for g in grads:
        if g is not None:
            scale_(g, grad_loss.detach().reshape(()).to(_acc(g.dtype)))
    return grads


# ------------------------------------------------------------------------------------------------
# full_kl: registered ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastft::full_kl", mutates_args=())
def _full_kl_op(
    policy: Tensor, ref: Tensor, mask: Optional[Tensor], temperature: float, reduction: int,
    grad_policy: bool, grad_ref: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    k = _kernels(backend)
    acc = _acc(policy.dtype)
    fused = reduction != _NONE and (grad_policy or grad_ref)
    scale = _reduction_scale(mask, policy.shape[0], reduction, acc, policy.device)
    kl, lse_p, lse_r, gp, gr = k.full_fwd(policy, ref, mask, scale if fused else None, temperature, grad_policy,
                                          grad_ref)
    if reduction == _NONE:
        loss = kl.to(policy.dtype, copy=True)
    else:
        loss = (kl.sum() * scale).to(policy.dtype)
    return loss, kl, lse_p, lse_r, gp, gr


@_full_kl_op.register_fake
def _(policy, ref, mask, temperature, reduction, grad_policy, grad_ref, backend):
    n, v = policy.shape
    acc = _acc(policy.dtype)
    fused = reduction != _NONE and (grad_policy or grad_ref)
    loss = policy.new_empty((n,) if reduction == _NONE else ())
    rows = [policy.new_empty((n,), dtype=acc) for _ in range(3)]
    gp = policy.new_empty((n, v) if fused and grad_policy else (0,))
    gr = policy.new_empty((n, v) if fused and grad_ref else (0,))
    return loss, *rows, gp, gr


@torch.library.custom_op("fastft::full_kl_backward", mutates_args=())
def _full_kl_backward_op(
    grad_kl: Tensor, policy: Tensor, ref: Tensor, mask: Optional[Tensor], lse_p: Tensor, lse_r: Tensor, kl: Tensor,
    temperature: float, grad_policy: bool, grad_ref: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    k = _kernels(backend)
    return k.full_bwd(grad_kl.to(kl.dtype).contiguous(), policy, ref, mask, lse_p, lse_r, kl, temperature,
                      grad_policy, grad_ref)


@_full_kl_backward_op.register_fake
def _(grad_kl, policy, ref, mask, lse_p, lse_r, kl, temperature, grad_policy, grad_ref, backend):
    return (policy.new_empty(policy.shape if grad_policy else (0,)), policy.new_empty(policy.shape if grad_ref else (0,)))


def _full_kl_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero [N, V] grads for the auxiliary outputs
    policy, ref, mask, temperature, reduction, grad_policy, grad_ref, backend = inputs
    _, kl, lse_p, lse_r, gp, gr = output
    ctx.reduction, ctx.backend, ctx.temperature = reduction, backend, temperature
    ctx.flags = (grad_policy, grad_ref)
    ctx.fused = reduction != _NONE and (grad_policy or grad_ref)
    ctx.grad_consumed = False
    if ctx.fused:
        ctx.save_for_backward(gp, gr)
    else:
        ctx.save_for_backward(policy, ref, mask, lse_p, lse_r, kl)


def _full_kl_backward(ctx, grad_loss, *_unused):
    grad_policy, grad_ref = ctx.flags
    if not ctx.fused:
        policy, ref, mask, lse_p, lse_r, kl = ctx.saved_tensors
        if not (grad_policy or grad_ref):
            return (None,) * 8
        if ctx.reduction != _NONE:
            scale = _reduction_scale(mask, policy.shape[0], ctx.reduction, kl.dtype, kl.device)
            grad_loss = (grad_loss.to(kl.dtype) * scale).expand(policy.shape[0])
        gp, gr = _full_kl_backward_op(grad_loss, policy, ref, mask, lse_p, lse_r, kl, ctx.temperature, grad_policy,
                                      grad_ref, ctx.backend)
    else:
        gp, gr = ctx.saved_tensors
        gp, gr = _scale_grads_once(ctx, [gp if grad_policy else None, gr if grad_ref else None], grad_loss, "full_kl")
    return (gp if grad_policy else None), (gr if grad_ref else None), None, None, None, None, None, None


_full_kl_op.register_autograd(_full_kl_backward, setup_context=_full_kl_setup)


# ------------------------------------------------------------------------------------------------
# selective_log_softmax: registered ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastft::selective_log_softmax", mutates_args=())
def _selective_log_softmax_op(logits: Tensor, index: Tensor, temperature: float, backend: str) -> tuple[Tensor, Tensor]:
    logp, lse = _kernels(backend).sel_fwd(logits, index, temperature)
    return logp.to(logits.dtype, copy=True), lse


@_selective_log_softmax_op.register_fake
def _(logits, index, temperature, backend):
    n = logits.shape[0]
    return logits.new_empty((n,)), logits.new_empty((n,), dtype=_acc(logits.dtype))


@torch.library.custom_op("fastft::selective_log_softmax_backward", mutates_args=())
def _selective_log_softmax_backward_op(
    grad_logp: Tensor, logits: Tensor, index: Tensor, lse: Tensor, temperature: float, backend: str
) -> Tensor:
    return _kernels(backend).sel_bwd(grad_logp.to(lse.dtype).contiguous(), logits, index, lse, temperature)


@_selective_log_softmax_backward_op.register_fake
def _(grad_logp, logits, index, lse, temperature, backend):
    return torch.empty_like(logits)


def _selective_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero [N, V] grads for the auxiliary outputs
    logits, index, temperature, backend = inputs
    ctx.temperature, ctx.backend = temperature, backend
    ctx.save_for_backward(logits, index, output[1])


def _selective_backward(ctx, grad_logp, _grad_lse):
    logits, index, lse = ctx.saved_tensors
    grad = _selective_log_softmax_backward_op(grad_logp, logits, index, lse, ctx.temperature, ctx.backend)
    return grad, None, None, None


_selective_log_softmax_op.register_autograd(_selective_backward, setup_context=_selective_setup)


# ------------------------------------------------------------------------------------------------
# linear_full_kl: chunked engine + registered ops
# ------------------------------------------------------------------------------------------------


def _chunk_rows(n: int, h: int, v: int, chunk_size: int) -> int:
    """Token rows per chunk: ``chunk_size`` when > 0; else Liger's rule, which keeps a chunk's
    logits about the size of the hidden states (next power of two of n / ceil(v / h))."""
    if chunk_size > 0:
        return max(1, min(chunk_size, n))
    rows = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / max(1, math.ceil(v / max(1, h))))))))
    return max(1, min(max(rows, 16), n))


class _HeadGrads:
    """Gradients of one head (hidden rows, weight) from each chunk's logit gradient. grad_W sums
    over chunks: fp16/bf16 weights accumulate it in fp32 (each chunk's GEMM rounds once)."""

    def __init__(self, hidden: Tensor, weight: Tensor, need_h: bool, need_w: bool, chunks: int) -> None:
        self.hidden, self.weight, self.need_h, self.need_w = hidden, weight, need_h, need_w
        low = weight.dtype in (torch.float16, torch.bfloat16)
        self.w_acc = torch.float32 if low and chunks > 1 else weight.dtype
        self.grad_h = torch.zeros_like(hidden) if need_h else None
        self.grad_w = torch.zeros(weight.shape, dtype=self.w_acc, device=weight.device) if need_w else None

    def add(self, rows: Tensor, start: int, end: int, dlogits: Tensor) -> None:
        h = self.hidden[rows] if rows is not None else self.hidden[start:end]
        if self.need_h:
            g = dlogits @ self.weight
            if rows is not None:
                self.grad_h.index_copy_(0, rows, g)
            else:
                self.grad_h[start:end] = g
        if self.need_w:
            if self.w_acc == dlogits.dtype:
                self.grad_w.addmm_(dlogits.t(), h)
            else:
                self.grad_w.add_(dlogits.t() @ h)

    def finish(self) -> tuple[Tensor, Tensor]:
        gh = self.grad_h if self.need_h else self.hidden.new_empty((0,))  # distinct empties: no aliasing outputs
        gw = self.grad_w.to(self.weight.dtype) if self.need_w else self.weight.new_empty((0,))
        return gh, gw


def _counted_rows(mask: Optional[Tensor]) -> Optional[Tensor]:
    # Masked tokens cost no GEMM at all: only the counted rows are chunked (one host sync on CUDA).
    return None if mask is None else mask.nonzero().reshape(-1)


def _linear_chunks(hp, wp, hr, wr, mask, temperature, chunk_size, backend, grad_scale, row_grad, saved, needs):
    """Run the chunks. Forward: ``row_grad`` None; returns kl/lse rows, and with ``grad_scale`` also the
    gradients (fused). Backward: ``row_grad`` [N] and ``saved`` = (lse_p, lse_r, kl); returns gradients."""
    k = _kernels(backend)
    n, v = hp.shape[0], wp.shape[0]
    rows_idx = _counted_rows(mask)
    m = n if rows_idx is None else int(rows_idx.numel())
    step = _chunk_rows(max(m, 1), max(hp.shape[1], hr.shape[1]), v, chunk_size)
    chunks = max(1, math.ceil(m / step))
    want_grads = grad_scale is not None or row_grad is not None
    sinks = None
    if want_grads:
        sinks = (_HeadGrads(hp, wp, needs[0], needs[1], chunks), _HeadGrads(hr, wr, needs[2], needs[3], chunks))
    acc = _acc(hp.dtype)
    kl_rows = torch.zeros((n,), dtype=acc, device=hp.device)
    lse_p = torch.zeros((n,), dtype=acc, device=hp.device)
    lse_r = torch.zeros((n,), dtype=acc, device=hp.device)
    grad_p_logits = needs[0] or needs[1]
    grad_r_logits = needs[2] or needs[3]
    for start in range(0, m, step):
        end = min(start + step, m)
        rows = None if rows_idx is None else rows_idx[start:end]
        sel = (lambda t: t[start:end]) if rows is None else (lambda t: t.index_select(0, rows))
        lp = sel(hp) @ wp.t()
        lr = sel(hr) @ wr.t()
        if row_grad is None:
            kl_c, lp_c, lr_c, gp, gr = k.full_fwd(lp, lr, None, grad_scale, temperature,
                                                 grad_p_logits and want_grads, grad_r_logits and want_grads)
            for dst, src in ((kl_rows, kl_c), (lse_p, lp_c), (lse_r, lr_c)):
                if rows is None:
                    dst[start:end] = src
                else:
                    dst.index_copy_(0, rows, src)
            del kl_c, lp_c, lr_c
        else:
            gp, gr = k.full_bwd(sel(row_grad), lp, lr, None, sel(saved[0]), sel(saved[1]), sel(saved[2]),
                                temperature, grad_p_logits, grad_r_logits)
        del lp, lr
        if want_grads:
            if grad_p_logits:
                sinks[0].add(rows, start, end, gp)
            if grad_r_logits:
                sinks[1].add(rows, start, end, gr)
        # Drop the chunk's gradients before the next kernel call: the C++ kernel then hands the same
        # cached buffers out again instead of page-faulting fresh ones.
        del gp, gr
    if not want_grads:
        return kl_rows, lse_p, lse_r
    return (*sinks[0].finish(), *sinks[1].finish()), (kl_rows, lse_p, lse_r)


@torch.library.custom_op("fastft::linear_full_kl", mutates_args=())
def _linear_full_kl_op(
    hp: Tensor, wp: Tensor, hr: Tensor, wr: Tensor, mask: Optional[Tensor], temperature: float, reduction: int,
    needs: list[bool], chunk_size: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = _acc(hp.dtype)
    n = hp.shape[0]
    scale = _reduction_scale(mask, n, reduction, acc, hp.device)
    if reduction != _NONE and any(needs):
        grads, (kl, lse_p, lse_r) = _linear_chunks(hp, wp, hr, wr, mask, temperature, chunk_size, backend, scale,
                                                   None, None, needs)
    else:
        kl, lse_p, lse_r = _linear_chunks(hp, wp, hr, wr, mask, temperature, chunk_size, backend, None, None, None,
                                          needs)
        grads = tuple(hp.new_empty((0,)) for _ in range(4))
    loss = kl.to(hp.dtype, copy=True) if reduction == _NONE else (kl.sum() * scale).to(hp.dtype)
    return loss, kl, lse_p, lse_r, *grads


@_linear_full_kl_op.register_fake
def _(hp, wp, hr, wr, mask, temperature, reduction, needs, chunk_size, backend):
    n = hp.shape[0]
    acc = _acc(hp.dtype)
    fused = reduction != _NONE and any(needs)
    loss = hp.new_empty((n,) if reduction == _NONE else ())
    rows = [hp.new_empty((n,), dtype=acc) for _ in range(3)]
    shapes = (hp.shape, wp.shape, hr.shape, wr.shape)
    like = (hp, wp, hr, wr)
    grads = [like[i].new_empty(shapes[i] if fused and needs[i] else (0,)) for i in range(4)]
    return loss, *rows, *grads


@torch.library.custom_op("fastft::linear_full_kl_backward", mutates_args=())
def _linear_full_kl_backward_op(
    row_grad: Tensor, hp: Tensor, wp: Tensor, hr: Tensor, wr: Tensor, mask: Optional[Tensor], lse_p: Tensor,
    lse_r: Tensor, kl: Tensor, temperature: float, needs: list[bool], chunk_size: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads, _ = _linear_chunks(hp, wp, hr, wr, mask, temperature, chunk_size, backend, None,
                              row_grad.to(kl.dtype).contiguous(), (lse_p, lse_r, kl), needs)
    return grads


@_linear_full_kl_backward_op.register_fake
def _(row_grad, hp, wp, hr, wr, mask, lse_p, lse_r, kl, temperature, needs, chunk_size, backend):
    like = (hp, wp, hr, wr)
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip(like, needs))


def _linear_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero [N, V] grads for the auxiliary outputs
    hp, wp, hr, wr, mask, temperature, reduction, needs, chunk_size, backend = inputs
    ctx.options = (temperature, list(needs), chunk_size, backend)
    ctx.reduction, ctx.backend = reduction, backend
    ctx.fused = reduction != _NONE and any(needs)
    ctx.grad_consumed = False
    if ctx.fused:
        ctx.save_for_backward(*output[4:])
    else:
        ctx.save_for_backward(hp, wp, hr, wr, mask, *output[1:4])


def _linear_backward(ctx, grad_loss, *_unused):
    needs = ctx.options[1]
    if ctx.fused:
        grads = _scale_grads_once(ctx, [g if need else None for g, need in zip(ctx.saved_tensors, needs)], grad_loss,
                                  "linear_full_kl")
    else:
        hp, wp, hr, wr, mask, kl, lse_p, lse_r = ctx.saved_tensors
        if not any(needs):
            return (None,) * 10
        if ctx.reduction != _NONE:
            scale = _reduction_scale(mask, hp.shape[0], ctx.reduction, kl.dtype, kl.device)
            grad_loss = (grad_loss.to(kl.dtype) * scale).expand(hp.shape[0])
        grads = _linear_full_kl_backward_op(grad_loss, hp, wp, hr, wr, mask, lse_p, lse_r, kl, *ctx.options)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None, None, None)


_linear_full_kl_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------


def _check_float(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _check_reduction(reduction) -> int:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    return _REDUCTIONS[reduction]


def _flat_mask(mask, token_shape: tuple, device, name: str = "mask") -> Optional[Tensor]:
    """mask (True / nonzero = counted) of shape token_shape -> contiguous bool [N], or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} must equal the token shape {tuple(token_shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the logits are on {device}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating point (nonzero = counted), got {mask.dtype}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.reshape(-1).contiguous()


def _pick_backend(device_type: str, dtype: torch.dtype) -> str:
    name = _backend.select(device_type, supported=_SUPPORTED)
    if name != "cpp" and dtype == torch.float64:
        name = "reference"  # the Triton kernels compute in fp32; keep fp64 exact
    return name


def _rows(t: Tensor, v: int) -> Tensor:
    t = t.reshape(-1, v)
    return t if t.shape[0] == 0 or t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------
# Public functionals
# ------------------------------------------------------------------------------------------------


def full_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    *,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Full-vocabulary KL(pi || pi_ref) per token, pi = softmax(policy_logits / T), pi_ref =
    softmax(ref_logits / T), over the last dimension: sum_v pi_v (log pi_v - log pi_ref_v).

    ``mask`` (shape = the logits' leading shape; True / nonzero = counted) zeroes the other tokens;
    reduction "none" -> per-token KL of the leading shape, "sum", or "mean" over counted tokens (0
    when none is counted). Gradients flow to ``policy_logits`` and, when it requires grad, to
    ``ref_logits``. ``ref_logits`` of another floating dtype are cast to the policy's. Tokens the
    policy gives probability 0 (logit -inf) contribute 0. The result has the policy's dtype.
    """
    _check_float(policy_logits, "policy_logits")
    _check_float(ref_logits, "ref_logits")
    if policy_logits.dim() == 0:
        raise ValueError("policy_logits must have a vocabulary dimension (shape [..., V]), got a 0-dim tensor")
    if policy_logits.shape[-1] != ref_logits.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: policy_logits has {policy_logits.shape[-1]} and ref_logits {ref_logits.shape[-1]} "
            "(last dimension)"
        )
    if tuple(policy_logits.shape) != tuple(ref_logits.shape):
        raise ValueError(f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} "
                         "must have the same shape")
    if policy_logits.shape[-1] == 0:
        raise ValueError("the logits have a vocabulary of size 0")
    if ref_logits.device != policy_logits.device:
        raise ValueError(f"ref_logits is on {ref_logits.device} but policy_logits is on {policy_logits.device}")
    temperature = _check_temperature(temperature)
    red = _check_reduction(reduction)
    token_shape = tuple(policy_logits.shape[:-1])
    flat_mask = _flat_mask(mask, token_shape, policy_logits.device)
    if ref_logits.dtype != policy_logits.dtype:
        ref_logits = ref_logits.to(policy_logits.dtype)
    backend = _pick_backend(policy_logits.device.type, policy_logits.dtype)
    if backend == "reference":
        return _reference.full_kl(policy_logits, ref_logits, mask=mask, temperature=temperature, reduction=reduction)
    v = policy_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    loss = _full_kl_op(
        _rows(policy_logits, v), _rows(ref_logits, v), flat_mask, temperature, red,
        grad_on and policy_logits.requires_grad, grad_on and ref_logits.requires_grad, backend,
    )[0]
    return loss.reshape(token_shape) if red == _NONE else loss


def _check_index(index: Tensor, num_classes: int) -> None:
    """Out-of-range indices raise on CPU; on CUDA only with FASTFT_DEBUG=1 (a host sync)."""
    if torch.compiler.is_compiling() or index.numel() == 0:
        return
    if index.device.type != "cpu" and not _backend.debug_checks():
        return
    bad = (index < 0) | (index >= num_classes)
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"index value {int(index.reshape(-1)[pos])} at flat position {pos} is out of range for a "
                         f"vocabulary of {num_classes} (valid: 0..{num_classes - 1})")


def selective_log_softmax(logits: Tensor, index: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T, -1).gather(-1, index[..., None])[..., 0]`` without the [..., V]
    log-softmax: the log-probability of the chosen tokens (TRL's ``selective_log_softmax``), in
    the logits' dtype, with its gradient. ``index`` has the logits' leading shape."""
    _check_float(logits, "logits")
    if not isinstance(index, Tensor):
        raise TypeError(f"index must be a torch.Tensor of token ids, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must hold integer token ids, got {index.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension (shape [..., V]), got a 0-dim tensor")
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"index shape {tuple(index.shape)} must equal the logits' leading shape "
                         f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})")
    if logits.shape[-1] == 0:
        raise ValueError("logits have a vocabulary of size 0")
    if index.device != logits.device:
        raise ValueError(f"index is on {index.device} but logits are on {logits.device}")
    temperature = _check_temperature(temperature)
    v = logits.shape[-1]
    _check_index(index, v)
    backend = _pick_backend(logits.device.type, logits.dtype)
    if backend == "reference":
        return _reference.selective_log_softmax(logits, index, temperature=temperature)
    flat_index = index.reshape(-1).to(torch.int64).contiguous()
    logp, _ = _selective_log_softmax_op(_rows(logits, v), flat_index, temperature, backend)
    return logp.reshape(index.shape)


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
    cancellation for small d), "abs" |d|. ``mask`` zeroes tokens; reductions as in :func:`full_kl`.

    Elementwise, so plain torch: autograd gives gradients to both inputs, and torch.compile fuses it
    with its neighbours (a custom op would be a fusion barrier)."""
    for t, name in ((logprobs, "logprobs"), (ref_logprobs, "ref_logprobs")):
        _check_float(t, name)
    if tuple(logprobs.shape) != tuple(ref_logprobs.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have "
                         "the same shape")
    if ref_logprobs.device != logprobs.device:
        raise ValueError(f"ref_logprobs is on {ref_logprobs.device} but logprobs is on {logprobs.device}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _check_reduction(reduction)
    if mask is not None:
        _flat_mask(mask, tuple(logprobs.shape), logprobs.device)
    return _reference.kl_penalty(logprobs, ref_logprobs, estimator=estimator, mask=mask, reduction=reduction)


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
) -> Tensor:
    """``full_kl(policy_hidden @ policy_weight.T, ref_hidden @ ref_weight.T, ...)`` computed in token
    chunks, never holding either [N, V] logits: per chunk two GEMMs, the full_kl kernel with its
    fused gradient, and the GEMMs into grad_hidden / grad_weight. Masked tokens are skipped
    entirely (no GEMM). Gradients to every input that requires grad (usually the policy's hidden
    states and head). ``chunk_size`` (token rows) overrides the automatic choice. The hidden sizes of
    the two models may differ; ref tensors of another floating dtype are cast to the policy's."""
    for t, name in ((policy_hidden, "policy_hidden"), (policy_weight, "policy_weight"), (ref_hidden, "ref_hidden"),
                    (ref_weight, "ref_weight")):
        _check_float(t, name)
        if t.device != policy_hidden.device:
            raise ValueError(f"{name} is on {t.device} but policy_hidden is on {policy_hidden.device}")
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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (token rows per chunk), got {chunk_size!r}")
    temperature = _check_temperature(temperature)
    red = _check_reduction(reduction)
    token_shape = tuple(policy_hidden.shape[:-1])
    flat_mask = _flat_mask(mask, token_shape, policy_hidden.device)
    dtype = policy_hidden.dtype
    policy_weight, ref_hidden, ref_weight = (t.to(dtype) for t in (policy_weight, ref_hidden, ref_weight))
    backend = _pick_backend(policy_hidden.device.type, dtype)
    if backend == "reference":
        return _reference.linear_full_kl(policy_hidden, policy_weight, ref_hidden, ref_weight, mask=mask,
                                         temperature=temperature, reduction=reduction)
    grad_on = torch.is_grad_enabled()
    ins = (policy_hidden.reshape(-1, policy_hidden.shape[-1]), policy_weight,
           ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight)
    needs = [bool(grad_on and t.requires_grad) for t in ins]
    ins = tuple(t.contiguous() for t in ins)
    loss = _linear_full_kl_op(*ins, flat_mask, temperature, red, needs, int(chunk_size or 0), backend)[0]
    return loss.reshape(token_shape) if red == _NONE else loss
