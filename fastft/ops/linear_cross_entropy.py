"""fastft.ops.linear_cross_entropy: the LM loss head that never holds the whole logits.

``loss = cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the [tokens x vocab]
logits or their gradient. Forward walks the tokens in chunks; per chunk:

    logits_c  = x_c @ W^T (+ b)                       one GEMM into a reused chunk buffer
    loss_c, dlogits_c = fused CE kernel(logits_c)     loss rows and grad_scale * dloss/dlogits in one
                                                      pass (the cross-entropy kernels of fastft.ops.
                                                      cross_entropy; on Triton written over logits_c)
    grad_x[c]  = dlogits_c @ W                        straight into its rows of grad_x
    grad_W    += dlogits_c^T @ x_c                    fp32 accumulator for fp16/bf16 over >1 chunk
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

Chunk size: rows = budget / (bytes of the chunk buffers per token row), where the budget is
FASTFT_LCE_CHUNK_BYTES (default 64 MiB on CPU, 512 MiB on CUDA) or ``chunk_size`` rows when given.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.linear_cross_entropy import linear_cross_entropy as _reference
from .cross_entropy import _is_traced, check_loss_options, check_targets, reduction_scale
from .cross_entropy import _kernels as _ce_kernels

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_NONE, _MEAN, _SUM = 0, 1, 2
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUPPORTED_BACKENDS = ("reference", "cpp", "triton", "cuda")
_DEFAULT_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


# ------------------------------------------------------------------------------------------------
# Chunked engine (runs inside the registered ops; plain eager torch + the CE kernels)
# ------------------------------------------------------------------------------------------------


def _chunk_rows(n: int, v: int, dtype: torch.dtype, device_type: str, buffers_per_row: int, chunk_size: int) -> int:
    """Token rows per chunk: ``chunk_size`` when > 0, else what fits the byte budget."""
    if chunk_size > 0:
        return max(1, min(chunk_size, n))
    env = os.environ.get("FASTFT_LCE_CHUNK_BYTES")
    budget = int(env) if env else _DEFAULT_CHUNK_BYTES.get(device_type, 512 << 20)
    row_bytes = max(1, v * torch.empty((), dtype=dtype).element_size() * buffers_per_row)
    rows = max(1, budget // row_bytes)
    if rows >= 64:
        rows -= rows % 16  # GEMM-friendly M
    return max(1, min(rows, n))


def _fused_ce_chunk(backend: str, in_place: bool):
    """(logits, target, weight, grad_scale|None, *options) -> (loss_rows, lse, grad|empty)."""
    fwd, _, _ = _ce_kernels(backend)
    if in_place and backend == "triton":
        # The Triton kernel can write the gradient over the logits chunk it reads (one buffer).
        def run(logits, target, weight, grad_scale, *options):
            out = logits if grad_scale is not None else None
            return fwd(logits, target, weight, grad_scale, *options, out=out)

        return run
    return fwd


def _chunk_buffers(backend: str, with_grad: bool) -> int:
    """[chunk x vocab] buffers alive at once: the logits, plus the CE gradient unless written in place."""
    return 1 if (not with_grad or backend == "triton") else 2


def _logits_into(out: Tensor, x_chunk: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is None:
        return torch.mm(x_chunk, weight.t(), out=out)
    return torch.addmm(bias, x_chunk, weight.t(), out=out)


class _GradSink:
    """Takes each chunk's logit gradient and turns it into the gradients of x, W and b that are
    wanted (and nothing else). grad_W and grad_b are sums over chunks: with fp16/bf16 and more than
    one chunk they are accumulated in fp32 and rounded once at the end. A GEMM over one chunk
    already accumulates in fp32 internally, so grad_x rows (one chunk each) are written directly."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], need_x: bool, need_w: bool,
                 need_b: bool, single_chunk: bool) -> None:
        n, h = x.shape
        v = weight.shape[0]
        self.need_x, self.need_w, self.need_b = need_x, need_w, need_b
        low = weight.dtype in (torch.float16, torch.bfloat16)
        self.w_dtype = weight.dtype
        self.w_acc_dtype = torch.float32 if (low and not single_chunk) else weight.dtype
        self.grad_x = torch.empty((n, h), dtype=x.dtype, device=x.device) if need_x else None
        self.grad_w = torch.empty((v, h), dtype=self.w_acc_dtype, device=x.device) if need_w else None
        self.first_w = True
        b_acc = torch.float64 if bias is not None and bias.dtype == torch.float64 else torch.float32
        self.grad_b = torch.zeros((v,), dtype=b_acc, device=x.device) if need_b else None
        self.bias_dtype = bias.dtype if bias is not None else None
        self.weight = weight

    def add(self, start: int, end: int, x_chunk: Tensor, dlogits: Tensor) -> None:
        if self.need_x:
            torch.mm(dlogits, self.weight, out=self.grad_x[start:end])
        if self.need_w:
            if self.grad_w.dtype == dlogits.dtype:
                if self.first_w:
                    torch.mm(dlogits.t(), x_chunk, out=self.grad_w)
                else:
                    self.grad_w.addmm_(dlogits.t(), x_chunk)
            else:
                # fp32 accumulation of half GEMMs (each rounds once; CPU and torch < 2.8 CUDA have no
                # half x half -> fp32 addmm).
                part = torch.mm(dlogits.t(), x_chunk)
                if self.first_w:
                    self.grad_w.copy_(part)
                else:
                    self.grad_w.add_(part)
                del part
            self.first_w = False
        if self.need_b:
            self.grad_b.add_(dlogits.sum(0, dtype=self.grad_b.dtype))

    def finish(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gx = self.grad_x if self.need_x else like.new_empty((0,))
        if self.need_w:
            if self.first_w:  # no rows at all
                self.grad_w.zero_()
            gw = self.grad_w.to(self.w_dtype)
        else:
            gw = like.new_empty((0,))
        gb = self.grad_b.to(self.bias_dtype) if self.need_b else like.new_empty((0,))
        return gx, gw, gb


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _counted_rows(target: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the counted rows when some but not all are ignored, on CPU; else None.

    An ignored row (padding, prompt tokens) has zero loss and zero gradient, so its share of all
    three GEMMs is skipped. Not on CUDA: finding the rows needs a host sync."""
    if target.device.type != "cpu":
        return None
    idx = (target != ignore_index).nonzero().squeeze(1)
    return idx if 0 < idx.numel() < target.numel() else None


def _scatter_rows(rows: Tensor, idx: Tensor, n: int) -> Tensor:
    full = rows.new_zeros((n,) + tuple(rows.shape[1:]))
    return full.index_copy_(0, idx, rows)


def _forward_chunks(x, weight, bias, target, class_weight, options, grad_scale, need_x, need_w, need_b,
                    chunk_size, backend):
    """Loss rows and lse for all tokens; with ``grad_scale`` also the scaled gradients."""
    n, _ = x.shape
    idx = _counted_rows(target, options[0])
    if idx is not None:
        loss_rows, lse, (gx, gw, gb) = _forward_chunks(
            x.index_select(0, idx), weight, bias, target.index_select(0, idx), class_weight, options, grad_scale,
            need_x, need_w, need_b, chunk_size, backend)
        gx = _scatter_rows(gx, idx, n) if gx.numel() else gx
        return _scatter_rows(loss_rows, idx, n), _scatter_rows(lse, idx, n), (gx, gw, gb)
    v = weight.shape[0]
    with_grad = grad_scale is not None
    rows = _chunk_rows(n, v, x.dtype, x.device.type, _chunk_buffers(backend, with_grad), chunk_size)
    acc = _acc_dtype(x.dtype)
    loss_rows = torch.empty((n,), dtype=acc, device=x.device)
    lse = torch.empty((n,), dtype=acc, device=x.device)
    sink = _GradSink(x, weight, bias, need_x, need_w, need_b, single_chunk=rows >= n) if with_grad else None
    ce = _fused_ce_chunk(backend, in_place=True)
    buf = torch.empty((min(rows, n), v), dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x_chunk = x[start:end]
        logits = _logits_into(buf[: end - start], x_chunk, weight, bias)
        loss_c, lse_c, dlogits = ce(logits, target[start:end], class_weight, grad_scale, *options)
        loss_rows[start:end].copy_(loss_c)
        lse[start:end].copy_(lse_c)
        if with_grad:
            sink.add(start, end, x_chunk, dlogits)
        # Drop the chunk's CE gradient before the next kernel call: the C++ kernel then hands the
        # same cached buffer out again instead of allocating (and page-faulting) a fresh one.
        del loss_c, lse_c, dlogits, logits
    grads = sink.finish(x) if with_grad else tuple(x.new_empty((0,)) for _ in range(3))
    return loss_rows, lse, grads


def _backward_chunks(row_grad, x, weight, bias, target, class_weight, lse, options, need_x, need_w, need_b,
                     chunk_size, backend):
    """Gradients for a per-row upstream gradient, recomputing each logits chunk from the saved lse."""
    n, _ = x.shape
    idx = _counted_rows(target, options[0])
    if idx is not None:
        gx, gw, gb = _backward_chunks(
            row_grad.index_select(0, idx), x.index_select(0, idx), weight, bias, target.index_select(0, idx),
            class_weight, lse.index_select(0, idx), options, need_x, need_w, need_b, chunk_size, backend)
        return (_scatter_rows(gx, idx, n) if gx.numel() else gx), gw, gb
    v = weight.shape[0]
    _, bwd, _ = _ce_kernels(backend)
    rows = _chunk_rows(n, v, x.dtype, x.device.type, 2, chunk_size)
    sink = _GradSink(x, weight, bias, need_x, need_w, need_b, single_chunk=rows >= n)
    buf = torch.empty((min(rows, n), v), dtype=x.dtype, device=x.device)
    row_grad = row_grad.to(lse.dtype).contiguous()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x_chunk = x[start:end]
        logits = _logits_into(buf[: end - start], x_chunk, weight, bias)
        dlogits = bwd(row_grad[start:end], logits, target[start:end], class_weight, lse[start:end], *options)
        sink.add(start, end, x_chunk, dlogits)
        del dlogits, logits
    return sink.finish(x)


# ------------------------------------------------------------------------------------------------
# Registered ops
# ------------------------------------------------------------------------------------------------


def _fuses_grads(reduction: int, grad_input: bool, grad_weight: bool, grad_bias: bool) -> bool:
    """Whether forward produces the gradients: always for mean/sum; for "none" only grad_x is
    row-wise rescalable afterwards."""
    if not (grad_input or grad_weight or grad_bias):
        return False
    return reduction != _NONE or not (grad_weight or grad_bias)


@torch.library.custom_op("fastft::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = (ignore_index, label_smoothing, z_loss, softcap)
    acc = _acc_dtype(input.dtype)
    scale = reduction_scale(target, weight, ignore_index, reduction, acc)
    fused = _fuses_grads(reduction, grad_input, grad_weight, grad_bias)
    need_b = grad_bias and linear_bias is not None
    loss_rows, lse, (gx, gw, gb) = _forward_chunks(
        input, linear_weight, linear_bias, target, weight, options, scale if fused else None,
        grad_input, grad_weight, need_b, chunk_size, backend,
    )
    loss = loss_rows if reduction == _NONE else loss_rows.sum() * scale
    return loss, lse, gx, gw, gb


@_linear_cross_entropy_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, softcap,
      reduction, grad_input, grad_weight, grad_bias, chunk_size, backend):
    n = input.shape[0]
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty((n,) if reduction == _NONE else (), dtype=acc)
    lse = input.new_empty((n,), dtype=acc)
    fused = _fuses_grads(reduction, grad_input, grad_weight, grad_bias)
    gx = input.new_empty(input.shape if fused and grad_input else (0,))
    gw = linear_weight.new_empty(linear_weight.shape if fused and grad_weight else (0,))
    has_gb = fused and grad_bias and linear_bias is not None
    gb = linear_bias.new_empty(linear_bias.shape) if has_gb else input.new_empty((0,))
    return loss, lse, gx, gw, gb


@torch.library.custom_op("fastft::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    need_b = grad_bias and linear_bias is not None
    return _backward_chunks(
        grad_loss, input, linear_weight, linear_bias, target, weight, lse,
        (ignore_index, label_smoothing, z_loss, softcap), grad_input, grad_weight, need_b, chunk_size, backend,
    )


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, input, linear_weight, linear_bias, target, weight, lse, ignore_index, label_smoothing, z_loss,
      softcap, grad_input, grad_weight, grad_bias, chunk_size, backend):
    gx = input.new_empty(input.shape if grad_input else (0,))
    gw = linear_weight.new_empty(linear_weight.shape if grad_weight else (0,))
    has_gb = grad_bias and linear_bias is not None
    gb = linear_bias.new_empty(linear_bias.shape) if has_gb else input.new_empty((0,))
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, softcap,
     reduction, grad_input, grad_weight, grad_bias, chunk_size, backend) = inputs
    _, lse, gx, gw, gb = output
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.reduction = reduction
    ctx.chunk_size = chunk_size
    ctx.backend = backend
    ctx.has_bias = linear_bias is not None
    ctx.fused = _fuses_grads(reduction, grad_input, grad_weight, grad_bias)
    ctx.fused_flags = (grad_input, grad_weight, grad_bias) if ctx.fused else (False, False, False)
    ctx.grad_consumed = False
    # Only the loss is differentiated; without this autograd would hand backward zero-filled
    # gradients for the other outputs, a [V, H] zeros for grad_W alone (measured: +129 MB, 160 ms).
    ctx.set_materialize_grads(False)
    if ctx.fused:
        if _is_traced(gx):
            ctx.save_for_backward(gx, gw, gb)
            ctx.grads_held = None
        else:
            # Eager: hold the gradients outside the saved-tensor machinery and hand them over in
            # backward with no other reference left, so AccumulateGrad adopts them as .grad instead
            # of copying (a saved tensor is still referenced when AccumulateGrad runs: it cloned the
            # [V, H] grad_W, +131 MB and a copy at V=32000, H=1024). No grad_fn on them: no cycle.
            ctx.mark_non_differentiable(gx, gw, gb)
            ctx.grads_held = [gx, gw, gb]
    else:
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse)


def _raise_backward_twice():
    raise RuntimeError(
        "fastft.linear_cross_entropy: backward ran twice through the same loss (retain_graph=True); the "
        "gradients computed in forward are scaled in place by the first backward. Recompute the loss instead."
    )


def _scale_in_place_once(ctx, grads: list[Tensor], grad_loss: Tensor) -> list[Tensor]:
    if ctx.grad_consumed:
        _raise_backward_twice()
    ctx.grad_consumed = True
    if ctx.reduction == _NONE:
        for g in grads:  # only grad_x is fused for "none": rows scale by their own upstream gradient
            g.mul_(grad_loss.reshape(-1, 1))
        return grads
    _, _, scale_ = _ce_kernels(ctx.backend)
    s = grad_loss.detach().reshape(()).to(_acc_dtype(grads[0].dtype) if grads else torch.float32)
    for g in grads:
        scale_(g, s)
    return grads


def _backward(ctx, grad_loss, _grad_lse, _gx, _gw, _gb):
    if grad_loss is None:  # only the auxiliary outputs were differentiated: they carry no gradient
        ctx.grads_held = None
        return (None,) * 15
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if ctx.fused:
        if ctx.grad_consumed and not _is_traced(grad_loss):
            _raise_backward_twice()  # before unpacking: autograd's own version check would fire, less clearly
        if ctx.grads_held is None:
            gx, gw, gb = ctx.saved_tensors
        else:
            (gx, gw, gb), ctx.grads_held = ctx.grads_held, None
        have = ctx.fused_flags
        if (need_x and not have[0]) or (need_w and not have[1]) or (need_b and not have[2] and ctx.has_bias):
            raise RuntimeError(
                "fastft.linear_cross_entropy: an input started requiring grad after the forward pass; "
                "its gradient was not computed"
            )
        picked = [g for g, want in zip((gx, gw, gb), (need_x, need_w, need_b and ctx.has_bias)) if want]
        if picked:
            if _is_traced(picked[0]):
                g_up = grad_loss.reshape(-1, 1) if ctx.reduction == _NONE else grad_loss
                picked = [g * g_up.to(g.dtype) for g in picked]
            else:
                picked = _scale_in_place_once(ctx, picked, grad_loss)
        it = iter(picked)
        out = [next(it) if want else None for want in (need_x, need_w, need_b and ctx.has_bias)]
    else:
        input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
        if ctx.reduction != _NONE:
            scale = reduction_scale(target, weight, ctx.options[0], ctx.reduction, lse.dtype)
            grad_loss = (grad_loss.to(lse.dtype) * scale).expand(target.shape[0])
        gx, gw, gb = _linear_cross_entropy_backward_op(
            grad_loss, input, linear_weight, linear_bias, target, weight, lse, *ctx.options,
            need_x, need_w, need_b and ctx.has_bias, ctx.chunk_size, ctx.backend,
        )
        out = [gx if need_x else None, gw if need_w else None, gb if need_b and ctx.has_bias else None]
    return (*out,) + (None,) * 12


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
                  z_loss, softcap, chunk_size) -> None:
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have a hidden dimension (shape [..., H]), got a 0-dim tensor")
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
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input is on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor):
            raise TypeError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(
                f"linear_bias shape {tuple(linear_bias.shape)} must be ({linear_weight.shape[0]},): one per row of "
                f"linear_weight {tuple(linear_weight.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} differs from input dtype {input.dtype}")
        if linear_bias.device != input.device:
            raise ValueError(f"linear_bias is on {linear_bias.device} but input is on {input.device}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices (int64 or int32), got {target.dtype}; "
            "class-probability targets are not supported"
        )
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the input's leading shape {tuple(input.shape[:-1])} "
            f"(input {tuple(input.shape)} is [..., hidden])"
        )
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    check_loss_options(weight, linear_weight.shape[0], input.device, ignore_index, reduction, label_smoothing, z_loss,
                       softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (token rows per chunk), got {chunk_size!r}")


def _autocast(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]):
    """Under torch.autocast, cast the GEMM operands as F.linear would; the loss then comes out in fp32
    as autocast's cross_entropy does. Returns (input, weight, bias, loss dtype or None)."""
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, linear_weight, linear_bias, None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(input), cast(linear_weight), cast(linear_bias), torch.float32


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
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    ``input`` is [..., H], ``linear_weight`` [V, H], ``linear_bias`` [V] or None, ``target`` the
    leading shape of ``input`` (class indices). Same values and gradients as the two-step version
    (and as torch's ``F.linear_cross_entropy`` for the arguments they share), with the options of
    :func:`fastft.ops.cross_entropy`: ``weight`` (per class), ``ignore_index``, ``reduction``,
    ``label_smoothing``, ``z_loss``, ``softcap``; an all-ignored batch gives 0 for "mean" (torch:
    NaN). ``chunk_size`` overrides the token rows per chunk (default: from FASTFT_LCE_CHUNK_BYTES).
    The loss has the input's dtype (fp32 under autocast, as torch). Gradients are computed in the
    forward pass for the inputs that require grad, so a second backward through the same loss
    raises (recompute the loss instead).
    """
    return _linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        chunk_size=chunk_size, loss_dtype=None,
    )


def _linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, ignore_index, reduction,
                          label_smoothing, z_loss, softcap, chunk_size, loss_dtype) -> Tensor:
    """linear_cross_entropy with the loss returned in ``loss_dtype`` (None: input's dtype, or fp32 under
    autocast). The Hugging Face integration asks for fp32, as transformers' loss upcasts the logits."""
    if isinstance(input, Tensor) and isinstance(linear_weight, Tensor):
        input, linear_weight, linear_bias, autocast_dtype = _autocast(input, linear_weight, linear_bias)
    else:
        autocast_dtype = None
    _check_inputs(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
                  z_loss, softcap, chunk_size)
    out_dtype = loss_dtype or autocast_dtype or input.dtype
    num_classes = linear_weight.shape[0]
    check_targets(target, num_classes, ignore_index)
    backend = _backend.select(input.device.type, _SUPPORTED_BACKENDS)
    if backend != "cpp" and input.dtype == torch.float64:
        backend = "reference"  # the Triton and CUDA kernels compute in fp32; keep fp64 exact
    if backend == "reference":
        loss = _reference(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        )
        return loss.to(out_dtype)
    hidden = input.shape[-1]
    x = input.reshape(-1, hidden)
    if not x.is_contiguous():
        x = x.contiguous()
    flat_target = target.reshape(-1).to(torch.int64)
    class_weight = None if weight is None else weight.to(torch.float32).contiguous()
    grad_on = torch.is_grad_enabled()
    loss, *_ = _linear_cross_entropy_op(
        x, linear_weight, linear_bias, flat_target, class_weight, int(ignore_index), float(label_smoothing),
        float(z_loss), float(softcap) if softcap is not None else 0.0, _REDUCTIONS[reduction],
        grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
        int(chunk_size or 0), backend,
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(out_dtype)
