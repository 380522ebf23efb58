"""fastft.ops.selective_log_softmax: log pi(index) -- and on request the entropy of pi -- without
materializing the [N, V] log-softmax (TRL's ``selective_log_softmax``, the per-token log-probs of PPO / GRPO).

Kernels (same signature on every backend; "cpp"/"cuda" torch.ops.fastft.* from csrc/cpu/kl.cpp and its
CUDA twin, "triton" fastft.kernels.kl, "reference" fastft.reference.kl with plain autograd; fastft.ops._losses
binds them, shared with fastft.ops.linear_selective_log_softmax):
  selective_log_softmax_fwd(logits[N,V], index[N] i64, temperature, ignore_index) -> (logp, lse, entropy: [N] f32)
  selective_log_softmax_bwd(grad_logp[N] f32, grad_entropy[N] f32 | None, logits, index, lse, entropy,
                            temperature, ignore_index, out=None) -> grad[N,V]
  (f32 is fp64 for fp64 logits on the C++ backend.) This op ignores no row (NO_IGNORE_INDEX).

The op's differentiable output is one [1, N] (logp) or [2, N] (logp; entropy) tensor, so one autograd
template (fastft.ops._define: output 0 is the differentiable one) carries both gradients.

A soft cap c (logits -> c * tanh(logits / c), then / T) runs around the kernels, so every backend has it: forward
caps a copy of each row chunk (chunk_rows' budget; the caller's logits stay untouched), backward recomputes the cap in row chunks (chunk_rows'
budget), runs the kernel in place on the chunk of the gradient and multiplies by the cap's derivative 1 - tanh^2:
beyond the logits' gradient itself, backward holds one chunk of derivatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...reference import kl as _reference
from .. import registry
from ..checks import (check_float_tensor, flat_index, check_index_tensor, check_indices_in_range, check_number,
                      check_same_device, rows)
from .._define import accumulator_dtype, define_op, standard_backends
from .._losses import (NO_IGNORE_INDEX, chunk_rows, log_softmax_extension_kernels, log_softmax_triton_kernels,
                       softcap_, softcap_with_derivative)

__all__ = ["selective_log_softmax"]


@dataclass(frozen=True)
class SelectiveLogSoftmaxOptions:
    temperature: float = 1.0
    with_entropy: bool = False  # output 0 is [2, N] (logp; entropy) instead of [1, N]
    softcap: float = 0.0  # 0 = no soft cap


def _forward(logits: Tensor, index: Tensor, options: SelectiveLogSoftmaxOptions,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    fwd = selective_log_softmax_op.kernels(backend).fwd
    if not options.softcap:
        logp, lse, entropy = fwd(logits, index, options.temperature, NO_IGNORE_INDEX)
    else:  # capped copies of row chunks (chunk_rows' budget), not of the whole logits
        n, v = logits.shape
        acc = accumulator_dtype(logits.dtype)
        logp, lse, entropy = (torch.empty((n,), dtype=acc, device=logits.device) for _ in range(3))
        rows = chunk_rows(n, v, logits.dtype, logits.device.type, 1, 0)
        buf = torch.empty((min(rows, n), v), dtype=logits.dtype, device=logits.device)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            capped = softcap_(buf[: end - start].copy_(logits[start:end]), options.softcap)
            for dst, src in zip((logp, lse, entropy), fwd(capped, index[start:end], options.temperature,
                                                          NO_IGNORE_INDEX)):
                dst[start:end].copy_(src)
    stats = torch.stack((logp, entropy)) if options.with_entropy else logp.unsqueeze(0)
    return stats, lse, entropy


def _fake(logits, index, options, backend):
    n, acc = logits.shape[0], accumulator_dtype(logits.dtype)
    return (logits.new_empty((1 + options.with_entropy, n), dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((n,), dtype=acc))


def _backward_impl(grad_stats: Tensor, logits: Tensor, index: Tensor, lse: Tensor, entropy: Tensor,
                   options: SelectiveLogSoftmaxOptions, backend: str) -> Tensor:
    grad_stats = grad_stats.to(lse.dtype)
    grad_logp = grad_stats[0].contiguous()
    grad_entropy = grad_stats[1].contiguous() if options.with_entropy else None
    bwd = selective_log_softmax_op.kernels(backend).bwd
    if not options.softcap:
        return bwd(grad_logp, grad_entropy, logits, index, lse, entropy, options.temperature, NO_IGNORE_INDEX)
    n, v = logits.shape
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    acc = accumulator_dtype(logits.dtype)
    rows = chunk_rows(n, v, acc, logits.device.type, 1, 0)
    derivative_buf = torch.empty((min(rows, n), v), dtype=acc, device=logits.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        derivative = derivative_buf[: end - start]
        capped = softcap_with_derivative(logits[start:end], options.softcap, capped_out=grad[start:end],
                                         derivative_out=derivative)
        pick = slice(start, end)
        bwd(grad_logp[pick], None if grad_entropy is None else grad_entropy[pick], capped, index[pick], lse[pick],
            entropy[pick], options.temperature, NO_IGNORE_INDEX, out=capped).mul_(derivative)
    return grad


def _setup(ctx, inputs, outputs):
    logits, index = inputs
    ctx.save_for_backward(logits, index, outputs[1], outputs[2])


def _backward(ctx, grad_stats):
    logits, index, lse, entropy = ctx.saved_tensors
    return ctx.run_backward(grad_stats, logits, index, lse, entropy), None


selective_log_softmax_op = define_op(
    "selective_log_softmax", forward=_forward, fake=_fake, setup=_setup, backward=_backward,
    backward_impl=_backward_impl, backward_fake=lambda grad_stats, logits, index, lse, entropy, options, backend:
    torch.empty_like(logits), options=SelectiveLogSoftmaxOptions,
    reference=_reference.selective_log_softmax,
    backends=standard_backends(log_softmax_extension_kernels, log_softmax_triton_kernels),
)


def selective_log_softmax(logits: Tensor, index: Tensor, *, temperature: float = 1.0,
                          softcap: Optional[float] = None, return_entropy: bool = False):
    """``log_softmax(logits / T, -1).gather(-1, index[..., None])[..., 0]`` without the [..., V]
    log-softmax: the log-probability of the chosen tokens (TRL's ``selective_log_softmax``), in
    the logits' dtype, with its gradient. ``index`` has the logits' leading shape. With
    ``return_entropy=True``: ``(logp, entropy)``, the entropy ``-sum_v p_v log p_v`` of ``softmax(logits / T)``
    per row (same dtype, differentiable too: an entropy bonus trains through it). ``softcap`` (> 0, or None for
    none): the logits are ``softcap * tanh(logits / softcap)`` first, then divided by ``T`` (Gemma-2/3's head,
    torch's order); gradients pass through the cap. The soft cap costs a capped copy of one row chunk in forward."""
    check_float_tensor("logits", logits, min_dim=1)
    check_index_tensor("index", index, "token ids")
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"index shape {tuple(index.shape)} must equal the logits' leading shape "
                         f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})")
    if logits.shape[-1] == 0:
        raise ValueError("logits have a vocabulary of size 0")
    check_same_device("logits", logits, index=index)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    if softcap is not None:
        softcap = check_number("softcap", softcap, low=0.0, low_open=True)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")
    v = logits.shape[-1]
    check_indices_in_range("index", index, v)
    return selective_log_softmax_op.dispatch(_run_kernels, logits, index, temperature=temperature, softcap=softcap,
                                             return_entropy=return_entropy)


def _run_kernels(backend, logits, index, *, temperature, softcap, return_entropy):
    v = logits.shape[-1]
    options = SelectiveLogSoftmaxOptions(temperature, return_entropy, softcap or 0.0)
    stats = selective_log_softmax_op(rows(logits, v), flat_index(index), options=options, backend=backend)[0]
    stats = stats.to(logits.dtype).unflatten(1, index.shape)
    return (stats[0], stats[1]) if return_entropy else stats[0]


registry.register(registry.OpEntry(
    name="selective_log_softmax", functional=selective_log_softmax, op=selective_log_softmax_op, benchmark="kl",
))
