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
autograd, no custom op). The op is defined through fastft.ops._define (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...reference.cross_entropy import cross_entropy as _reference
from .. import registry
from ..checks import (check_float_tensor, check_index_tensor, check_indices_in_range, check_same_device, check_tensor,
                      flat_index)
from .._define import accumulator_dtype, define_op, save_fused_grads, scale_fused_grads, standard_backends
from .._losses import (ce_extension_kernels, ce_reduction_scale, ce_triton_kernels, check_ce_options,
                       scale_in_place)


@dataclass(frozen=True)
class CrossEntropyOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # 0 = no softcap
    reduction: str = "mean"
    inplace_backward: bool = False  # the gradient is written over the logits (see cross_entropy's docstring)

    def kernel_args(self) -> tuple:
        return self.ignore_index, self.label_smoothing, self.z_loss, self.softcap


def _fused(options: CrossEntropyOptions, compute_grad: bool) -> bool:
    return compute_grad and options.reduction != "none"


def _forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], compute_grad: bool,
             options: CrossEntropyOptions, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulator_dtype(logits.dtype)
    scale = ce_reduction_scale(target, weight, options.ignore_index, options.reduction, acc)
    fused = _fused(options, compute_grad)
    in_place = fused and options.inplace_backward
    loss_rows, lse, grad = cross_entropy_op.kernels(backend).ce_fwd(
        logits, target, weight, scale if fused else None, *options.kernel_args(), out=logits if in_place else None)
    if in_place:
        # The gradient now lives in logits' storage; an op that saved the logits for its own backward
        # raises torch's "modified by an inplace operation" error instead of reading gradients.
        torch.autograd.graph.increment_version(logits)
        grad = logits.new_empty((0,))  # outputs may not alias inputs; setup keeps the logits instead
    if options.reduction == "none":
        loss = loss_rows.to(logits.dtype)
    else:
        loss = (loss_rows.sum() * scale).to(logits.dtype)
    return loss, lse, grad


def _fake(logits, target, weight, compute_grad, options, backend):
    n, v = logits.shape
    loss = logits.new_empty((n,) if options.reduction == "none" else ())
    lse = logits.new_empty((n,), dtype=accumulator_dtype(logits.dtype))
    grad = logits.new_empty((n, v) if _fused(options, compute_grad) and not options.inplace_backward else (0,))
    return loss, lse, grad


def _backward_impl(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                   options: CrossEntropyOptions, backend: str) -> Tensor:
    out = logits if options.inplace_backward else None
    grad = cross_entropy_op.kernels(backend).ce_bwd(grad_loss.to(lse.dtype).contiguous(), logits, target, weight, lse,
                                        *options.kernel_args(), out=out)
    if out is not None:
        torch.autograd.graph.increment_version(logits)
    return grad


def _backward_fake(grad_loss, logits, target, weight, lse, options, backend):
    return torch.empty_like(logits)


def _setup(ctx, inputs, outputs):
    logits, target, weight, compute_grad = inputs
    ctx.fused = _fused(ctx.options, compute_grad)
    if ctx.fused:
        save_fused_grads(ctx, logits if ctx.options.inplace_backward else outputs[2])
    else:
        ctx.save_for_backward(logits, target, weight, outputs[1])


def _backward(ctx, grad_loss):
    if ctx.fused:
        (grad,) = scale_fused_grads(ctx, grad_loss, scale_in_place(cross_entropy_op.kernels(ctx.backend).scale_))
        return grad, None, None, None
    # Per-row upstream gradient (reduction "none", or a mean/sum whose logits did not require grad in
    # forward): one sweep from the saved logsumexp.
    logits, target, weight, lse = ctx.saved_tensors
    if ctx.options.reduction != "none":
        scale = ce_reduction_scale(target, weight, ctx.options.ignore_index, ctx.options.reduction, lse.dtype)
        grad_loss = (grad_loss.to(lse.dtype) * scale).expand(target.shape[0])
    return ctx.run_backward(grad_loss, logits, target, weight, lse), None, None, None


def _reference_cross_entropy(input, target, weight, *, inplace_backward=False, **options):
    """The "reference" backend: fastft.reference.cross_entropy (plain autograd); with ``inplace_backward``
    its gradient is copied into ``input``, the same memory contract as the kernels."""
    if inplace_backward:
        return _ReferenceInPlace.apply(input, target, weight, options)
    return _reference(input, target, weight, **options)


cross_entropy_op = define_op(
    "cross_entropy", forward=_forward, fake=_fake, setup=_setup, backward=_backward,
    backward_impl=_backward_impl, backward_fake=_backward_fake, options=CrossEntropyOptions,
    reference=_reference_cross_entropy, backends=standard_backends(ce_extension_kernels, ce_triton_kernels),
)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    check_tensor("input", input)
    check_index_tensor("target", target)
    check_float_tensor("input", input, min_dim=1)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the input's leading shape {tuple(input.shape[:-1])} "
            f"(input {tuple(input.shape)}: the class dimension is the LAST one; for torch's [N, C, d1, ...] "
            "layout pass input.movedim(1, -1))"
        )
    if input.shape[-1] == 0:
        raise ValueError("input has 0 classes")
    check_same_device("input", input, target=target)
    check_ce_options(weight, input.shape[-1], input.device, ignore_index, reduction, label_smoothing, z_loss, softcap)


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
    inplace_backward: bool = False,
) -> Tensor:
    """Cross-entropy over the last dimension of ``input`` with class-index ``target``.

    Matches ``torch.nn.functional.cross_entropy`` (values and gradients) for the arguments they
    share, with the class dimension last. Extras: ``z_loss`` adds ``z_loss * logsumexp(x)**2`` per
    counted token; ``softcap`` replaces the logits by ``softcap * tanh(x / softcap)`` first.
    Deliberate difference: when every target is ignored, ``reduction="mean"`` returns 0 and a zero
    gradient where torch returns NaN. Out-of-range targets raise ValueError on CPU; on CUDA they are
    checked only with ``FASTFT_DEBUG=1`` (no host sync by default) and otherwise give a NaN loss.

    Hostile values: -inf logits are classes of probability 0 anywhere in the row; a target whose own logit
    is -inf gives loss +inf (gradient p - onehot, finite); a counted row without any finite logit, and any
    NaN or +inf logit, give NaN (never a silently finite loss). Ignored rows are never read.

    ``inplace_backward=True`` (Liger-Kernel's memory contract): the gradient with respect to ``input`` is
    written into ``input``'s own storage instead of a new [N, V] tensor -- during forward for "mean"/"sum",
    during backward for "none". **The logits are overwritten**: do not read them after the call. Safety
    nets: an op that saved ``input`` for its own backward raises torch's "modified by an inplace operation"
    error (the version counter is bumped) instead of reading gradients; a leaf ``input`` (a tensor you
    created, a parameter) or a view of one is refused, since it would be destroyed and become its own
    ``.grad``. Nothing is overwritten when no gradient is computed (no_grad, input not requiring grad),
    when ``input`` is not contiguous in its class dimension (the copy takes the gradient), or under
    torch.compile (a registered op may not mutate its inputs: the gradient is then out of place).
    """
    _check_inputs(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    num_classes = input.shape[-1]
    check_indices_in_range("target", target, num_classes, ignore_index)
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    in_place = _check_inplace_backward(inplace_backward, input, compute_grad)
    return cross_entropy_op.dispatch(_run_kernels, input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                     inplace_backward=in_place)


def _run_kernels(backend, input, target, weight, *, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 inplace_backward):
    num_classes = input.shape[-1]
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    logits = input.reshape(-1, num_classes)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    flat_target = flat_index(target)
    w = None if weight is None else weight.to(accumulator_dtype(input.dtype)).contiguous()
    options = CrossEntropyOptions(int(ignore_index), float(label_smoothing), float(z_loss),
                                  float(softcap) if softcap is not None else 0.0, reduction, inplace_backward)
    loss = cross_entropy_op(logits, flat_target, w, compute_grad, options=options, backend=backend)[0]
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss


def _check_inplace_backward(inplace_backward, input: Tensor, compute_grad: bool) -> bool:
    """Whether the gradient goes into ``input``'s storage; raises where that would destroy user data."""
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if not (inplace_backward and compute_grad) or torch.compiler.is_compiling():
        return False
    base = input if input._base is None else input._base
    if base.is_leaf:
        raise ValueError(
            "inplace_backward=True writes the gradient over the logits, but input is "
            + ("a leaf tensor" if base is input else "a view of a leaf tensor")
            + " (one you created or a parameter): it would be destroyed and become its own .grad. Pass "
            "logits computed by the graph (e.g. the LM head's output), or inplace_backward=False")
    return True


class _ReferenceInPlace(torch.autograd.Function):
    """The reference backend's inplace_backward: the reference's gradient, copied into ``input``."""

    @staticmethod
    def forward(ctx, input, target, weight, kw):
        with torch.enable_grad():
            x = input.detach().requires_grad_()
            loss = _reference(x, target, weight, **kw)
            (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        input.copy_(grad)  # the gradient of each row for an upstream of 1 ("none": of its own loss)
        torch.autograd.graph.increment_version(input)
        ctx.input, ctx.reduction = input, kw["reduction"]
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        grad = ctx.input
        if ctx.reduction == "none":
            grad.mul_(grad_loss.reshape(*grad_loss.shape, 1).to(grad.dtype))
        else:
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None


registry.register(registry.OpEntry(
    name="cross_entropy", functional=cross_entropy, op=cross_entropy_op, benchmark="cross_entropy",
))
