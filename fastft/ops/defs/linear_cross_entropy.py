"""fastft.ops.linear_cross_entropy: the LM loss head that never holds the whole logits.

``loss = cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the [tokens x vocab]
logits or their gradient. Forward walks the tokens in chunks; per chunk:

    logits_c  = x_c @ W^T (+ b)                       one GEMM into a reused chunk buffer
    loss_c, dlogits_c = fused CE kernel(logits_c)     loss rows and grad_scale * dloss/dlogits in one
                                                      pass (the cross-entropy kernels of fastft.ops.
                                                      cross_entropy), the gradient written over logits_c
    grad_x[c]  = dlogits_c @ W                        straight into its rows of grad_x
    grad_W    += dlogits_c^T @ x_c                    in place, in W's dtype (addmm_, beta = 1)
    grad_b    += sum_rows dlogits_c

grad_scale is the reduction's factor for the whole batch (1/number of counted tokens for "mean"),
computed once up front, so the gradients are final when forward ends and backward only multiplies
them by the upstream gradient -- and skips even that when it is exactly 1 (``loss.backward()``).
Only the gradients of inputs that require grad are computed: with a frozen weight (LoRA) there is
no weight-gradient GEMM at all. The three GEMMs are the ones eager linear + cross-entropy does.

reduction="none" has a per-token upstream gradient. grad_x is linear in it row by row, so when only
the input needs a gradient the fused forward still applies (unscaled; backward scales the rows).
When the weight or bias needs one, forward saves the row logsumexps and backward recomputes the
logits chunk by chunk (one extra GEMM) with the per-row gradient.

Memory: grad_x, grad_W (in the weight's dtype, no fp32 copy: fastft.ops._losses.HeadGrads) and one
[rows x vocab] chunk buffer in the input's dtype; nothing else of size N x V or V x H.
Chunk size (fastft.ops._losses.chunk_rows, shared with linear_full_kl): ``chunk_size`` rows when given,
else rows = budget / (vocab x element size), where the budget is FASTFT_LCE_CHUNK_BYTES when set, else
the device default (64 MiB on CPU, 512 MiB on CUDA) -- lowered on CUDA, when grad_W is computed, to a
sixth of grad_W's bytes (at least 64 MiB): the chunk then adds at most ~17% to the gradients' own memory
(8192 x 4096 x 128256 bf16: grad_W 1002 MiB + grad_x 64 MiB + chunk 167 MiB = 1.29 GB planned). Each
chunk after the first re-reads and re-writes grad_W (beta = 1), so fewer, larger chunks trade memory for
traffic; FASTFT_LCE_CHUNK_BYTES moves that point. Ignored rows are dropped before the GEMMs on CPU; on CUDA
(where finding them is a host sync) every row is computed and the kernels skip the ignored ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...reference.linear_cross_entropy import linear_cross_entropy as _reference
from .. import registry
from ..checks import (check_chunk_size, flat_index, check_float_tensor, check_index_tensor, check_indices_in_range,
                      check_same_device, check_tensor)
from .._define import accumulator_dtype, define_op, save_fused_grads, scale_fused_grads, standard_backends
from .._losses import (HeadGrads, ce_extension_kernels, ce_triton_kernels, autocast_operands, ce_reduction_scale, check_ce_options, chunk_rows,
                      counted_rows,
                      logits_into, scale_in_place, scale_rows_in_place, scatter_rows)
from .cross_entropy import CrossEntropyOptions

__all__ = ["linear_cross_entropy", "LinearCrossEntropyOptions"]


@dataclass(frozen=True)
class LinearCrossEntropyOptions(CrossEntropyOptions):
    chunk_size: int = 0  # token rows per chunk; 0 = from the byte budget


# ------------------------------------------------------------------------------------------------
# Chunked engine (runs inside the registered ops; plain eager torch + the CE kernels)
# ------------------------------------------------------------------------------------------------


def _fused_ce_chunk(backend: str):
    """(logits, target, weight, grad_scale|None, *options) -> (loss_rows, lse, grad|empty); the gradient
    is written over the logits chunk it was computed from (every backend's kernel takes out=), so one
    [chunk x vocab] buffer is alive at a time."""
    fwd = linear_cross_entropy_op.kernels(backend).ce_fwd

    def run(logits, target, weight, grad_scale, *options):
        return fwd(logits, target, weight, grad_scale, *options, out=logits if grad_scale is not None else None)

    return run


def _plan_rows(n: int, x: Tensor, weight: Tensor, needs: tuple, chunk_size: int) -> int:
    """Token rows per chunk (one [rows x vocab] buffer; see fastft.ops._losses.chunk_rows)."""
    grad_bytes = weight.numel() * weight.element_size() if needs[1] else 0
    return chunk_rows(n, weight.shape[0], x.dtype, x.device.type, 1, chunk_size, grad_w_bytes=grad_bytes)


def _forward_chunks(x, weight, bias, target, class_weight, options, grad_scale, needs, backend):
    """Loss rows and lse for all tokens; with ``grad_scale`` also the scaled gradients (gx, gW, gb)."""
    n, _ = x.shape
    idx = counted_rows(target != options.ignore_index)
    if idx is not None:
        loss_rows, lse, (gx, gw, gb) = _forward_chunks(
            x.index_select(0, idx), weight, bias, target.index_select(0, idx), class_weight, options, grad_scale,
            needs, backend)
        gx = scatter_rows(gx, idx, n) if gx.numel() else gx
        return scatter_rows(loss_rows, idx, n), scatter_rows(lse, idx, n), (gx, gw, gb)
    v = weight.shape[0]
    with_grad = grad_scale is not None
    rows = _plan_rows(n, x, weight, needs if with_grad else (False, False, False), options.chunk_size)
    acc = accumulator_dtype(x.dtype)
    loss_rows = torch.empty((n,), dtype=acc, device=x.device)
    lse = torch.empty((n,), dtype=acc, device=x.device)
    sink = HeadGrads(x, weight, bias, *needs) if with_grad else None
    ce = _fused_ce_chunk(backend)
    buf = torch.empty((min(rows, n), v), dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x_chunk = x[start:end]
        logits = logits_into(buf[: end - start], x_chunk, weight, bias)
        loss_c, lse_c, dlogits = ce(logits, target[start:end], class_weight, grad_scale, *options.kernel_args())
        loss_rows[start:end].copy_(loss_c)
        lse[start:end].copy_(lse_c)
        if with_grad:
            sink.add(start, end, x_chunk, dlogits)
        del loss_c, lse_c, dlogits, logits
    grads = sink.finish(x) if with_grad else tuple(x.new_empty((0,)) for _ in range(3))
    return loss_rows, lse, grads


def _backward_chunks(row_grad, x, weight, bias, target, class_weight, lse, options, needs, backend):
    """Gradients for a per-row upstream gradient, recomputing each logits chunk from the saved lse."""
    n, _ = x.shape
    idx = counted_rows(target != options.ignore_index)
    if idx is not None:
        gx, gw, gb = _backward_chunks(
            row_grad.index_select(0, idx), x.index_select(0, idx), weight, bias, target.index_select(0, idx),
            class_weight, lse.index_select(0, idx), options, needs, backend)
        return (scatter_rows(gx, idx, n) if gx.numel() else gx), gw, gb
    v = weight.shape[0]
    bwd = linear_cross_entropy_op.kernels(backend).ce_bwd
    rows = _plan_rows(n, x, weight, needs, options.chunk_size)
    sink = HeadGrads(x, weight, bias, *needs)
    buf = torch.empty((min(rows, n), v), dtype=x.dtype, device=x.device)
    row_grad = row_grad.to(lse.dtype).contiguous()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x_chunk = x[start:end]
        logits = logits_into(buf[: end - start], x_chunk, weight, bias)
        dlogits = bwd(row_grad[start:end], logits, target[start:end], class_weight, lse[start:end],
                      *options.kernel_args(), out=logits)
        sink.add(start, end, x_chunk, dlogits)
        del dlogits, logits
    return sink.finish(x)


# ------------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------------


def _fuses_grads(reduction: str, grad_input: bool, grad_weight: bool, grad_bias: bool) -> bool:
    """Whether forward produces the gradients: always for mean/sum; for "none" only grad_x is
    row-wise rescalable afterwards."""
    if not (grad_input or grad_weight or grad_bias):
        return False
    return reduction != "none" or not (grad_weight or grad_bias)


def _forward(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
             weight: Optional[Tensor], grad_input: bool, grad_weight: bool, grad_bias: bool,
             options: LinearCrossEntropyOptions, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    scale = ce_reduction_scale(target, weight, options.ignore_index, options.reduction,
                               accumulator_dtype(input.dtype))
    fused = _fuses_grads(options.reduction, grad_input, grad_weight, grad_bias)
    needs = (grad_input, grad_weight, grad_bias and linear_bias is not None)
    loss_rows, lse, (gx, gw, gb) = _forward_chunks(input, linear_weight, linear_bias, target, weight, options,
                                                   scale if fused else None, needs, backend)
    loss = loss_rows if options.reduction == "none" else loss_rows.sum() * scale
    return loss, lse, gx, gw, gb


def _fake(input, linear_weight, linear_bias, target, weight, grad_input, grad_weight, grad_bias, options, backend):
    n = input.shape[0]
    acc = accumulator_dtype(input.dtype)
    loss = input.new_empty((n,) if options.reduction == "none" else (), dtype=acc)
    lse = input.new_empty((n,), dtype=acc)
    fused = _fuses_grads(options.reduction, grad_input, grad_weight, grad_bias)
    return (loss, lse, *_grads_fake(input, linear_weight, linear_bias, fused and grad_input, fused and grad_weight,
                                    fused and grad_bias))


def _grads_fake(input, linear_weight, linear_bias, need_x, need_w, need_b):
    gx = input.new_empty(input.shape if need_x else (0,))
    gw = linear_weight.new_empty(linear_weight.shape if need_w else (0,))
    gb = linear_bias.new_empty(linear_bias.shape) if need_b and linear_bias is not None else input.new_empty((0,))
    return gx, gw, gb


def _backward_impl(grad_loss: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                   target: Tensor, weight: Optional[Tensor], lse: Tensor, grad_input: bool, grad_weight: bool,
                   grad_bias: bool, options: LinearCrossEntropyOptions, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    needs = (grad_input, grad_weight, grad_bias and linear_bias is not None)
    return _backward_chunks(grad_loss, input, linear_weight, linear_bias, target, weight, lse, options, needs, backend)


def _backward_fake(grad_loss, input, linear_weight, linear_bias, target, weight, lse, grad_input, grad_weight,
                   grad_bias, options, backend):
    return _grads_fake(input, linear_weight, linear_bias, grad_input, grad_weight, grad_bias)


def _setup(ctx, inputs, outputs):
    input, linear_weight, linear_bias, target, weight, grad_input, grad_weight, grad_bias = inputs
    ctx.has_bias = linear_bias is not None
    ctx.fused = _fuses_grads(ctx.options.reduction, grad_input, grad_weight, grad_bias)
    ctx.fused_flags = (grad_input, grad_weight, grad_bias) if ctx.fused else (False, False, False)
    if ctx.fused:
        save_fused_grads(ctx, *outputs[2:])
    else:
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, outputs[1])


def _backward(ctx, grad_loss):
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    wanted = (need_x, need_w, need_b and ctx.has_bias)
    if ctx.fused:
        have = ctx.fused_flags
        if any(w and not h for w, h in zip(wanted, have)):
            raise RuntimeError("fastft.linear_cross_entropy: an input started requiring grad after the forward "
                               "pass; its gradient was not computed")
        if ctx.options.reduction == "none":  # only grad_x is fused for "none": rows scale by their own gradient
            out = scale_fused_grads(ctx, grad_loss.reshape(-1, 1), scale_rows_in_place, wanted)
        else:
            out = scale_fused_grads(ctx, grad_loss, scale_in_place(linear_cross_entropy_op.kernels(ctx.backend).scale_),
                                    wanted)
    else:
        input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
        if ctx.options.reduction != "none":
            scale = ce_reduction_scale(target, weight, ctx.options.ignore_index, ctx.options.reduction, lse.dtype)
            grad_loss = (grad_loss.to(lse.dtype) * scale).expand(target.shape[0])
        grads = ctx.run_backward(grad_loss, input, linear_weight, linear_bias, target, weight, lse, *wanted)
        out = [g if w else None for g, w in zip(grads, wanted)]
    return (*out, None, None, None, None, None)


def _reference_ignoring_chunks(*args, chunk_size=None, **kwargs):
    """The "reference" backend: fastft.reference.linear_cross_entropy (whole logits, plain autograd; no chunks)."""
    return _reference(*args, **kwargs)


linear_cross_entropy_op = define_op(
    "linear_cross_entropy", forward=_forward, fake=_fake, setup=_setup, backward=_backward,
    backward_impl=_backward_impl, backward_fake=_backward_fake, options=LinearCrossEntropyOptions,
    reference=_reference_ignoring_chunks, backends=standard_backends(ce_extension_kernels, ce_triton_kernels),
)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
                  z_loss, softcap, chunk_size) -> None:
    check_tensor("input", input)
    check_tensor("linear_weight", linear_weight)
    check_index_tensor("target", target)
    check_float_tensor("input", input, min_dim=1)
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be 2-D [num_classes, hidden], got shape {tuple(linear_weight.shape)}")
    if linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: input {tuple(input.shape)} has {input.shape[-1]} features but linear_weight "
            f"{tuple(linear_weight.shape)} expects {linear_weight.shape[1]} (linear_weight is [num_classes, hidden])"
        )
    if linear_weight.shape[0] == 0:
        raise ValueError("linear_weight has 0 rows (0 classes)")
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight dtype {linear_weight.dtype} differs from input dtype {input.dtype} "
            "(cast one of them, or run under torch.autocast)"
        )
    if linear_bias is not None:
        check_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(
                f"linear_bias shape {tuple(linear_bias.shape)} must be ({linear_weight.shape[0]},): one per row of "
                f"linear_weight {tuple(linear_weight.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} differs from input dtype {input.dtype}")
    check_same_device("input", input, linear_weight=linear_weight, linear_bias=linear_bias, target=target)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the input's leading shape {tuple(input.shape[:-1])} "
            f"(input {tuple(input.shape)} is [..., hidden])"
        )
    check_ce_options(weight, linear_weight.shape[0], input.device, ignore_index, reduction, label_smoothing, z_loss,
                     softcap)
    check_chunk_size(chunk_size)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    loss_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    ``input`` is [..., H], ``linear_weight`` [V, H], ``linear_bias`` [V] or None, ``target`` the
    leading shape of ``input`` (class indices). Same values and gradients as the two-step version
    (and as torch's ``F.linear_cross_entropy`` for the arguments they share), with the options of
    :func:`fastft.ops.cross_entropy`: ``weight`` (per class), ``ignore_index``, ``reduction``,
    ``label_smoothing``, ``z_loss``, ``softcap``; an all-ignored batch gives 0 for "mean" (torch:
    NaN). ``chunk_size`` overrides the token rows per chunk (default: from FASTFT_LCE_CHUNK_BYTES).
    The loss has the input's dtype (fp32 under autocast, as torch), or ``loss_dtype`` when given (the
    Hugging Face integration asks for fp32, as transformers' loss upcasts the logits). Gradients are
    computed in the forward pass for the inputs that require grad and scaled by the upstream gradient
    in backward (a second backward with ``retain_graph=True`` works, eager and compiled).
    """
    if isinstance(input, Tensor) and isinstance(linear_weight, Tensor):
        input, linear_weight, linear_bias, autocast_dtype = autocast_operands(input, linear_weight, linear_bias)
    else:
        autocast_dtype = None
    _check_inputs(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
                  z_loss, softcap, chunk_size)
    out_dtype = loss_dtype or autocast_dtype or input.dtype
    check_indices_in_range("target", target, linear_weight.shape[0], ignore_index)
    loss = linear_cross_entropy_op.dispatch(
        _run_kernels, input, linear_weight, target, linear_bias=linear_bias, weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size)
    return loss.to(out_dtype)


def _run_kernels(backend, input, linear_weight, target, *, linear_bias, weight, ignore_index, reduction,
                 label_smoothing, z_loss, softcap, chunk_size):
    x = input.reshape(-1, input.shape[-1])
    if not x.is_contiguous():
        x = x.contiguous()
    flat_target = flat_index(target)
    class_weight = None if weight is None else weight.to(accumulator_dtype(input.dtype)).contiguous()
    grad_on = torch.is_grad_enabled()
    # By keyword: the fields are inherited from CrossEntropyOptions, whose field list may grow.
    options = LinearCrossEntropyOptions(ignore_index=int(ignore_index), label_smoothing=float(label_smoothing),
                                        z_loss=float(z_loss), softcap=float(softcap) if softcap is not None else 0.0,
                                        reduction=reduction, chunk_size=int(chunk_size or 0))
    loss = linear_cross_entropy_op(
        x, linear_weight, linear_bias, flat_target, class_weight, grad_on and input.requires_grad,
        grad_on and linear_weight.requires_grad, grad_on and linear_bias is not None and linear_bias.requires_grad,
        options=options, backend=backend,
    )[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


registry.register(registry.OpEntry(
    name="linear_cross_entropy", functional=linear_cross_entropy, op=linear_cross_entropy_op, benchmark="linear_cross_entropy",
))
