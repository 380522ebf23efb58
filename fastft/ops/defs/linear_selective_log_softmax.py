"""fastft.ops.linear_selective_log_softmax: the chosen tokens' log-probs and the softmax entropy of a linear
head, from the hidden states, never holding the [tokens x vocab] logits.

    z = (hidden @ W^T + b) / T,   logp = log_softmax(z)[target],   entropy = -sum_v p_v log p_v
    with a soft cap c (Gemma-2/3):  z = c * tanh((hidden @ W^T + b) / c) / T   (cap first, then / T: torch's order)

Forward walks the tokens in chunks (the chunk policy and gradient sinks of fastft.ops.linear_cross_entropy,
fastft.ops._losses: chunk_rows, logits_into, HeadGrads); per chunk:

    logits_c = x_c @ W^T (+ b)                        one GEMM into a reused [rows x vocab] buffer
    logits_c = c * tanh(logits_c / c)                 in place, only with a soft cap
    logp_c, lse_c, entropy_c = selective log-softmax forward kernel(logits_c)   (fastft.ops.selective_log_softmax's)
    is_top1_c = argmax(logits_c) == target_c          only when asked (TRL's metric; a read of the chunk in hand)

Backward recomputes each chunk's logits (one GEMM), runs the selective log-softmax backward kernel with both
upstream gradients, written over the logits buffer it reads (out=), and sends that gradient to grad_x / grad_W /
grad_b through HeadGrads -- only for inputs that require grad. With a soft cap the chunk is capped in place
before the kernel, the cap's derivative 1 - tanh^2 kept in a second [rows x vocab] buffer (fp32: the chunk
policy counts it), and the kernel's gradient multiplied by it: no kernel knows about the cap, so every backend
has it. Unlike linear_cross_entropy, the gradients are
not computed in forward: the upstream gradients of two per-token outputs are only known in backward.
So each step costs one forward GEMM, and in backward one recompute GEMM plus the GEMMs of the wanted gradients.

Rows whose target is ``ignore_index`` give logp = entropy = 0 and no gradient: dropped before the GEMMs on CPU;
on CUDA (where finding them is a host sync) computed and skipped by the kernels. Outputs are fp32 (fp64 for fp64).
The op's one differentiable output is [2, N] (logp; entropy), so fastft.ops._define's template (output 0 is the
differentiable one) carries both gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...reference import kl as _reference
from .. import registry
from ..checks import (check_chunk_size, check_float_tensor, check_index_tensor, check_indices_in_range, check_number,
                      check_same_device, flat_index)
from .._define import accumulator_dtype, define_op, standard_backends
from .._losses import (HeadGrads, autocast_operands, chunk_rows, counted_rows, log_softmax_extension_kernels,
                      log_softmax_triton_kernels, logits_into, scatter_rows, softcap_, softcap_with_derivative)

__all__ = ["linear_selective_log_softmax", "LinearLogSoftmaxOptions"]


@dataclass(frozen=True)
class LinearLogSoftmaxOptions:
    temperature: float = 1.0
    ignore_index: int = -100
    chunk_size: int = 0  # token rows per chunk; 0 = from the byte budget
    with_top1: bool = False  # also output is_top1 [N] bool (target == first argmax of the capped logits)
    softcap: float = 0.0  # 0 = no soft cap


def _chunk_rows(n: int, x: Tensor, weight: Tensor, need_w: bool, buffers: int, chunk_size: int) -> int:
    grad_bytes = weight.numel() * weight.element_size() if need_w else 0
    return chunk_rows(n, weight.shape[0], x.dtype, x.device.type, buffers, chunk_size, grad_w_bytes=grad_bytes)


def _forward_chunks(x, weight, bias, target, options, backend):
    """(logp, lse, entropy, is_top1 | empty) for all rows."""
    n = x.shape[0]
    idx = counted_rows(target != options.ignore_index)
    if idx is not None:
        outs = _forward_chunks(x.index_select(0, idx), weight, bias, target.index_select(0, idx), options, backend)
        return tuple(scatter_rows(o, idx, n) if o.numel() else o for o in outs)
    fwd = linear_selective_log_softmax_op.kernels(backend).fwd
    acc = accumulator_dtype(x.dtype)
    logp, lse, entropy = (torch.empty((n,), dtype=acc, device=x.device) for _ in range(3))
    is_top1 = torch.empty((n,) if options.with_top1 else (0,), dtype=torch.bool, device=x.device)
    rows = _chunk_rows(n, x, weight, False, 1, options.chunk_size)
    buf = torch.empty((min(rows, n), weight.shape[0]), dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        logits = logits_into(buf[: end - start], x[start:end], weight, bias)
        if options.softcap:
            softcap_(logits, options.softcap)
        t = target[start:end]
        for dst, src in zip((logp, lse, entropy), fwd(logits, t, options.temperature, options.ignore_index)):
            dst[start:end].copy_(src)
        if options.with_top1:  # argmax is the first maximum: TRL's tie rule (of the capped logits, as TRL's)
            torch.logical_and(logits.argmax(-1) == t, t != options.ignore_index, out=is_top1[start:end])
        del logits
    return logp, lse, entropy, is_top1


def _backward_chunks(grad_logp, grad_entropy, x, weight, bias, target, lse, entropy, options, needs, backend):
    """(grad_x, grad_W, grad_b) (empty (0,) where not wanted) for the per-row upstream gradients."""
    n = x.shape[0]
    idx = counted_rows(target != options.ignore_index)
    if idx is not None:
        pick = (lambda t: t.index_select(0, idx))
        gx, gw, gb = _backward_chunks(pick(grad_logp), pick(grad_entropy), pick(x), weight, bias, pick(target),
                                      pick(lse), pick(entropy), options, needs, backend)
        return (scatter_rows(gx, idx, n) if gx.numel() else gx), gw, gb
    bwd = linear_selective_log_softmax_op.kernels(backend).bwd
    capped = bool(options.softcap)
    acc = accumulator_dtype(x.dtype)
    # with a cap, the derivative buffer (accumulation dtype) in units of the logits buffer: 2 for bf16, 1 for fp32
    derivative_buffers = acc.itemsize // x.dtype.itemsize if capped else 0
    rows = _chunk_rows(n, x, weight, needs[1], 1 + derivative_buffers, options.chunk_size)
    sink = HeadGrads(x, weight, bias, *needs)
    shape = (min(rows, n), weight.shape[0])
    buf = torch.empty(shape, dtype=x.dtype, device=x.device)
    cap_derivative_buf = torch.empty(shape, dtype=acc, device=x.device) if capped else None
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x_chunk, t = x[start:end], target[start:end]
        logits = logits_into(buf[: end - start], x_chunk, weight, bias)
        if capped:
            cap_derivative = cap_derivative_buf[: end - start]
            softcap_with_derivative(logits, options.softcap, capped_out=logits, derivative_out=cap_derivative)
        dlogits = bwd(grad_logp[start:end], grad_entropy[start:end], logits, t, lse[start:end],
                      entropy[start:end], options.temperature, options.ignore_index, out=logits)
        if capped:
            dlogits.mul_(cap_derivative)
        sink.add(start, end, x_chunk, dlogits)
        del dlogits, logits
    return sink.finish(x)


# ------------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------------


def _forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             options: LinearLogSoftmaxOptions, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    logp, lse, entropy, is_top1 = _forward_chunks(hidden, weight, bias, target, options, backend)
    return torch.stack((logp, entropy)), lse, entropy, is_top1


def _fake(hidden, weight, bias, target, options, backend):
    n, acc = hidden.shape[0], accumulator_dtype(hidden.dtype)
    return (hidden.new_empty((2, n), dtype=acc), hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc),
            hidden.new_empty((n,) if options.with_top1 else (0,), dtype=torch.bool))


def _grads_fake(hidden, weight, bias, need_x, need_w, need_b):
    gx = hidden.new_empty(hidden.shape if need_x else (0,))
    gw = weight.new_empty(weight.shape if need_w else (0,))
    gb = bias.new_empty(bias.shape) if need_b and bias is not None else hidden.new_empty((0,))
    return gx, gw, gb


def _backward_impl(grad_stats: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   lse: Tensor, entropy: Tensor, need_x: bool, need_w: bool, need_b: bool,
                   options: LinearLogSoftmaxOptions, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grad_stats = grad_stats.to(lse.dtype)
    needs = (need_x, need_w, need_b and bias is not None)
    return _backward_chunks(grad_stats[0].contiguous(), grad_stats[1].contiguous(), hidden, weight, bias, target, lse,
                            entropy, options, needs, backend)


def _backward_fake(grad_stats, hidden, weight, bias, target, lse, entropy, need_x, need_w, need_b, options, backend):
    return _grads_fake(hidden, weight, bias, need_x, need_w, need_b)


def _setup(ctx, inputs, outputs):
    hidden, weight, bias, target = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, target, outputs[1], outputs[2])


def _backward(ctx, grad_stats):
    wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
    if not any(wanted):
        return None, None, None, None
    hidden, weight, bias, target, lse, entropy = ctx.saved_tensors
    grads = ctx.run_backward(grad_stats, hidden, weight, bias, target, lse, entropy, *wanted)
    return (*(g if w else None for g, w in zip(grads, wanted)), None)


def _reference_stats(hidden, weight, target, *, bias, temperature, softcap, ignore_index, chunk_size, with_top1):
    """The "reference" backend: fastft.reference.kl.linear_selective_log_softmax (whole logits, plain autograd;
    no chunks) -> (logp, entropy, is_top1 | None)."""
    logp, entropy = _reference.linear_selective_log_softmax(hidden, weight, target, bias=bias, temperature=temperature,
                                                            softcap=softcap, ignore_index=ignore_index,
                                                            return_entropy=True)
    is_top1 = None
    if with_top1:
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden, weight, bias)
            if softcap is not None:
                logits = softcap_(logits, softcap)
            is_top1 = (logits.argmax(-1) == target) & (target != ignore_index)
    return logp, entropy, is_top1


linear_selective_log_softmax_op = define_op(
    "linear_selective_log_softmax", forward=_forward, fake=_fake, setup=_setup, backward=_backward,
    backward_impl=_backward_impl, backward_fake=_backward_fake, options=LinearLogSoftmaxOptions,
    reference=_reference_stats,
    backends=standard_backends(log_softmax_extension_kernels, log_softmax_triton_kernels),
)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, target, bias, ignore_index, softcap, chunk_size) -> None:
    check_float_tensor("hidden", hidden, min_dim=1)
    check_float_tensor("weight", weight)
    check_index_tensor("target", target, "token ids")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} has {hidden.shape[-1]} features but "
                         f"weight {tuple(weight.shape)} expects {weight.shape[1]} (weight is [vocab, hidden])")
    if weight.shape[0] == 0:
        raise ValueError("weight has 0 rows (a vocabulary of size 0)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype} (cast one of them, "
                        "or run under torch.autocast)")
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be ({weight.shape[0]},): one per row of weight")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    check_same_device("hidden", hidden, weight=weight, bias=bias, target=target)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal the hidden states' leading shape "
                         f"{tuple(hidden.shape[:-1])} (hidden {tuple(hidden.shape)} is [..., hidden])")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None:
        check_number("softcap", softcap, low=0.0, low_open=True)
    check_chunk_size(chunk_size)


def linear_selective_log_softmax(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                                 temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                                 chunk_size: Optional[int] = None, return_entropy: bool = False):
    """``log_softmax((hidden @ weight.T + bias) / T).gather(-1, target)`` per token -- and with
    ``return_entropy=True`` also the entropy ``-sum_v p_v log p_v`` of that softmax: ``(logp, entropy)`` --
    computed in token chunks, never holding the [..., V] logits. ``softcap`` (> 0, or None for none): the
    logits are ``softcap * tanh(logits / softcap)`` first (Gemma-2/3's ``final_logit_softcapping``), then divided
    by ``T``, as torch would compute it; gradients pass through the cap. ``hidden`` [..., H], ``weight`` [V, H],
    ``bias`` [V] or None, ``target`` the leading shape of ``hidden``. Results are fp32 (fp64 for fp64 inputs),
    0 where ``target == ignore_index``; both are differentiable (an entropy bonus trains through the entropy)
    with respect to every input that requires grad. Under torch.autocast the GEMMs run in its dtype, as
    F.linear's would. ``chunk_size`` overrides the token rows per chunk (default: from FASTFT_LCE_CHUNK_BYTES).

    Only log-probs and a loss that is a plain sum of them? :func:`fastft.ops.linear_cross_entropy`
    (``reduction="none"``, negated) is cheaper: it computes its gradients in forward, with no recompute GEMM."""
    return _linear_selective_log_softmax(hidden, weight, target, bias, temperature, softcap, ignore_index, chunk_size,
                                         return_entropy, with_top1=False)


def linear_log_softmax_stats(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                             temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                             chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`linear_selective_log_softmax` with ``return_entropy=True`` plus ``is_top1`` [...] bool: the target
    is the first argmax of the (capped) logits (False on ignored rows; no gradient), from the chunk the forward
    holds anyway (no extra GEMM). TRL's SFT / GRPO metrics (``entropy``, ``mean_token_accuracy``)."""
    return _linear_selective_log_softmax(hidden, weight, target, bias, temperature, softcap, ignore_index, chunk_size,
                                         True, with_top1=True)


def _linear_selective_log_softmax(hidden, weight, target, bias, temperature, softcap, ignore_index, chunk_size,
                                  return_entropy, with_top1):
    if isinstance(hidden, Tensor) and isinstance(weight, Tensor):
        hidden, weight, bias, _ = autocast_operands(hidden, weight, bias)
    _check_inputs(hidden, weight, target, bias, ignore_index, softcap, chunk_size)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")
    check_indices_in_range("target", target, weight.shape[0], ignore_index)
    logp, entropy, is_top1 = linear_selective_log_softmax_op.dispatch(
        _run_kernels, hidden, weight, target, bias=bias, temperature=temperature,
        softcap=None if softcap is None else float(softcap), ignore_index=int(ignore_index),
        chunk_size=int(chunk_size or 0), with_top1=with_top1)
    if with_top1:
        return logp, entropy, is_top1
    return (logp, entropy) if return_entropy else logp


def _run_kernels(backend, hidden, weight, target, *, bias, temperature, softcap, ignore_index, chunk_size,
                 with_top1):
    x = hidden.reshape(-1, hidden.shape[-1])
    if not x.is_contiguous():
        x = x.contiguous()
    options = LinearLogSoftmaxOptions(temperature, ignore_index, chunk_size, with_top1, softcap or 0.0)
    stats, _, _, is_top1 = linear_selective_log_softmax_op(x, weight, bias, flat_index(target), options=options,
                                                           backend=backend)
    stats = stats.unflatten(1, target.shape)
    return stats[0], stats[1], (is_top1.reshape(target.shape) if with_top1 else None)


registry.register(registry.OpEntry(
    name="linear_selective_log_softmax", functional=linear_selective_log_softmax, op=linear_selective_log_softmax_op,
    benchmark=None,  # not a harness bench yet: the one-off benchmarks/bench_token_entropy.py measures it
))
