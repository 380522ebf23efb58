"""fastft.ops.cross_entropy: the registered op, its fake, its autograd, and backend dispatch.

Data flow (reduction "mean"/"sum", logits requiring grad): one kernel pass per row computes the
loss *and* writes d(loss)/d(logits) already scaled by the reduction (1/denominator for "mean"), so
backward only multiplies by the upstream gradient, and skips even that when it is exactly 1 (the
usual ``loss.backward()``). The logits are read once and the gradient written once. For
reduction "none" the upstream gradient is per token, so forward saves the row logsumexp and
backward writes the gradient in one pass from it.

Kernels (same signature on every backend):
  cross_entropy_fwd(logits[N,V], target[N] i64, weight[V] f32?, grad_scale[] f32?,
                    ignore_index, label_smoothing, z_loss, softcap) -> (loss[N] f32, lse[N] f32, grad)
      (loss and lse are fp64 for fp64 logits on the C++ backend, the only one that takes fp64)
      grad = grad_scale * d(loss_i)/d(logits) in logits' dtype when grad_scale is given, else empty.
      Rows whose target is ignore_index are not read on any backend: loss 0, gradient 0, lse stored as 0.
  cross_entropy_bwd(grad_loss[N] f32, logits, target, weight?, lse, ignore_index, label_smoothing,
                    z_loss, softcap) -> grad[N,V]
  scale_if_not_one_(grad, scale[] f32): grad *= scale, touching nothing when scale == 1 (called
      in eager backward; under torch.compile the scaling is a plain multiply in the traced graph).
Backends: "cpp" and "cuda" are torch.ops.fastft.*_kernel from fastft._C (csrc/cpu, csrc/cuda);
"triton" is fastft.kernels.cross_entropy; "reference" is fastft.reference.cross_entropy (plain
autograd, no custom op).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.cross_entropy import cross_entropy as _reference

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_NONE, _MEAN, _SUM = 0, 1, 2
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _kernels(backend: str):
    if backend == "triton":
        from ..kernels import cross_entropy as k

        return k.cross_entropy_fwd, k.cross_entropy_bwd, k.scale_if_not_one_
    ops = torch.ops.fastft
    return ops.cross_entropy_fwd_kernel, ops.cross_entropy_bwd_kernel, ops.scale_if_not_one_kernel_


def reduction_scale(
    target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The factor that turns the sum of row losses into the reduced loss, as a 0-dim tensor on
    the target's device (no host sync): 1 for "sum", 1/sum(w_y over counted rows) for "mean",
    and 0 when no row counts (so an all-ignored batch gives loss 0 and a zero gradient)."""
    if reduction != _MEAN:
        return torch.ones((), dtype=dtype, device=target.device)
    counted = target != ignore_index
    if weight is None:
        denom = counted.sum(dtype=dtype)
    else:
        safe_t = torch.where(counted, target, torch.zeros_like(target)).clamp_(0, weight.numel() - 1)
        denom = (weight.to(dtype)[safe_t] * counted).sum()
    return torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))


# ------------------------------------------------------------------------------------------------
# Registered ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastft::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: int,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    fwd, _, _ = _kernels(backend)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scale = reduction_scale(target, weight, ignore_index, reduction, acc)
    fuse_grad = compute_grad and reduction != _NONE
    loss_rows, lse, grad = fwd(
        logits, target, weight, scale if fuse_grad else None, ignore_index, label_smoothing, z_loss, softcap
    )
    if reduction == _NONE:
        loss = loss_rows.to(logits.dtype)
    else:
        loss = (loss_rows.sum() * scale).to(logits.dtype)
    return loss, lse, grad


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_grad, backend):
    n, v = logits.shape
    loss = logits.new_empty((n,) if reduction == _NONE else ())
    lse = logits.new_empty((n,), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    grad = logits.new_empty((n, v) if compute_grad and reduction != _NONE else (0,))
    return loss, lse, grad


@torch.library.custom_op("fastft::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> Tensor:
    _, bwd, _ = _kernels(backend)
    return bwd(grad_loss.to(lse.dtype).contiguous(), logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap)


@_cross_entropy_backward_op.register_fake
def _(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits)


def _is_traced(t: Tensor) -> bool:
    """True while torch.compile / AOTAutograd traces (fake or functional tensors): no in-place tricks then."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or is_fake(t) or isinstance(t, FunctionalTensor)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_grad, backend = inputs
    _, lse, grad = output
    # lse and grad are auxiliary outputs: without this autograd would build a zero [N, V] "gradient"
    # for grad on every backward.
    ctx.mark_non_differentiable(lse, grad)
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.reduction = reduction
    ctx.backend = backend
    ctx.fused = compute_grad and reduction != _NONE
    ctx.grad_consumed = False
    if ctx.fused:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, weight, lse)


def _backward(ctx, grad_loss, _grad_lse, _grad_grad):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None, None
    if not ctx.fused:
        # Per-row upstream gradient (reduction "none", or a mean/sum whose logits did not require
        # grad in forward): one sweep from the saved logsumexp.
        logits, target, weight, lse = ctx.saved_tensors
        if ctx.reduction != _NONE:
            scale = reduction_scale(target, weight, ctx.options[0], ctx.reduction, lse.dtype)
            grad_loss = (grad_loss.to(lse.dtype) * scale).expand(target.shape[0])
        grad = _cross_entropy_backward_op(grad_loss, logits, target, weight, lse, *ctx.options, ctx.backend)
        return grad, None, None, None, None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    if _is_traced(grad):
        grad = grad * grad_loss.to(grad.dtype)
    else:
        # Eager: scale the forward's gradient buffer in place; a no-op for the usual upstream 1.0.
        if ctx.grad_consumed:
            raise RuntimeError(
                "fastft.cross_entropy: backward ran twice through the same loss (retain_graph=True); the fused "
                "gradient buffer is scaled in place by the first backward. Recompute the loss instead."
            )
        ctx.grad_consumed = True
        _, _, scale_ = _kernels(ctx.backend)
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        scale_(grad, grad_loss.detach().reshape(()).to(acc))
    return grad, None, None, None, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor of logits, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"input must be float32, float16, bfloat16 or float64 logits, got {input.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices (int64 or int32), got {target.dtype}; "
            "class-probability targets are not supported"
        )
    if input.dim() == 0:
        raise ValueError("input must have a class dimension (shape [..., C]), got a 0-dim tensor")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the input's leading shape {tuple(input.shape[:-1])} "
            f"(input {tuple(input.shape)}: the class dimension is the LAST one; for torch's [N, C, d1, ...] "
            "layout pass input.movedim(1, -1))"
        )
    if input.shape[-1] == 0:
        raise ValueError("input has 0 classes")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    check_loss_options(weight, input.shape[-1], input.device, ignore_index, reduction, label_smoothing, z_loss, softcap)


def check_loss_options(weight, num_classes, device, ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    """The cross-entropy options shared by every loss built on it (also fused linear cross-entropy)."""
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            raise ValueError(f"weight (class weights) must have shape ({num_classes},), one per class, got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but input is on {device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(float(z_loss)) and float(z_loss) >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (math.isfinite(float(softcap)) and float(softcap) > 0.0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError on a target outside [0, num_classes) that is not ignore_index. Always on CPU
    tensors; on CUDA only with FASTFT_DEBUG=1 (it syncs with the host). Skipped while compiling."""
    if torch.compiler.is_compiling():
        return
    if target.device.type != "cpu" and not _backend.debug_checks():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(target.reshape(-1)[pos])
        raise ValueError(
            f"target value {value} at flat position {pos} is out of range for {num_classes} classes "
            f"(valid: 0..{num_classes - 1}, or ignore_index={ignore_index})"
        )


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """Cross-entropy over the last dimension of ``input`` with class-index ``target``.

    Matches ``torch.nn.functional.cross_entropy`` (values and gradients) for the arguments they
    share, with the class dimension last. Extras: ``z_loss`` adds ``z_loss * logsumexp(x)**2`` per
    counted token; ``softcap`` replaces the logits by ``softcap * tanh(x / softcap)`` first.
    Deliberate difference: when every target is ignored, ``reduction="mean"`` returns 0 and a zero
    gradient where torch returns NaN. Out-of-range targets raise ValueError on CPU; on CUDA they are
    checked only with ``FASTFT_DEBUG=1`` (no host sync by default) and otherwise give a NaN loss.
    """
    _check_inputs(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    num_classes = input.shape[-1]
    check_targets(target, num_classes, ignore_index)
    device_type = input.device.type
    backend = _backend.select(device_type)
    if backend != "cpp" and input.dtype == torch.float64:
        backend = "reference"  # Triton and CUDA kernels compute in fp32; keep fp64 exact
    if backend == "reference":
        return _reference(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        )
    logits = input.reshape(-1, num_classes)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    flat_target = target.reshape(-1).to(torch.int64)
    w_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(w_dtype).contiguous()
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    loss, _, _ = _cross_entropy_op(
        logits, flat_target, w, int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 0.0, _REDUCTIONS[reduction], compute_grad, backend,
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss
