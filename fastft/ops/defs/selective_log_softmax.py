"""fastft.ops.selective_log_softmax: log pi(index) without materializing the [N, V] log-softmax
(TRL's ``selective_log_softmax``, the per-token log-probs of PPO / GRPO).

Kernels (same signature on every backend; "cpp"/"cuda" torch.ops.fastft.* from csrc/cpu/kl.cpp and its
CUDA twin, "triton" fastft.kernels.kl, "reference" fastft.reference.kl with plain autograd):
  selective_log_softmax_fwd(logits[N,V], index[N] i64, temperature) -> (logp[N] f32, lse[N] f32)
  selective_log_softmax_bwd(grad_logp[N] f32, logits, index, lse, temperature) -> grad[N,V]
  (f32 is fp64 for fp64 logits on the C++ backend.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...reference import kl as _reference
from .. import registry
from ..checks import (check_float_tensor, flat_index, check_index_tensor, check_indices_in_range, check_number,
                      check_same_device, rows)
from .._define import accumulator_dtype, define_op, extension_kernels, standard_backends, triton_kernels

__all__ = ["selective_log_softmax"]

@dataclass(frozen=True)
class SelectiveLogSoftmaxOptions:
    temperature: float = 1.0


def _forward(logits: Tensor, index: Tensor, options: SelectiveLogSoftmaxOptions, backend: str) -> tuple[Tensor, Tensor]:
    logp, lse = selective_log_softmax_op.kernels(backend).fwd(logits, index, options.temperature)
    return logp.to(logits.dtype, copy=True), lse


def _fake(logits, index, options, backend):
    n = logits.shape[0]
    return logits.new_empty((n,)), logits.new_empty((n,), dtype=accumulator_dtype(logits.dtype))


def _backward_impl(grad_logp: Tensor, logits: Tensor, index: Tensor, lse: Tensor,
                   options: SelectiveLogSoftmaxOptions, backend: str) -> Tensor:
    return selective_log_softmax_op.kernels(backend).bwd(grad_logp.to(lse.dtype).contiguous(), logits, index, lse,
                                                         options.temperature)


def _setup(ctx, inputs, outputs):
    logits, index = inputs
    ctx.save_for_backward(logits, index, outputs[1])


def _backward(ctx, grad_logp):
    logits, index, lse = ctx.saved_tensors
    return ctx.run_backward(grad_logp, logits, index, lse), None


selective_log_softmax_op = define_op(
    "selective_log_softmax", forward=_forward, fake=_fake, setup=_setup, backward=_backward,
    backward_impl=_backward_impl, backward_fake=lambda grad_logp, logits, index, lse, options, backend:
    torch.empty_like(logits), options=SelectiveLogSoftmaxOptions,
    reference=_reference.selective_log_softmax,
    backends=standard_backends(
        extension_kernels(fwd="selective_log_softmax_fwd_kernel", bwd="selective_log_softmax_bwd_kernel"),
        triton_kernels("kl", fwd="selective_log_softmax_fwd", bwd="selective_log_softmax_bwd")),
)


def selective_log_softmax(logits: Tensor, index: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T, -1).gather(-1, index[..., None])[..., 0]`` without the [..., V]
    log-softmax: the log-probability of the chosen tokens (TRL's ``selective_log_softmax``), in
    the logits' dtype, with its gradient. ``index`` has the logits' leading shape."""
    check_float_tensor("logits", logits, min_dim=1)
    check_index_tensor("index", index, "token ids")
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"index shape {tuple(index.shape)} must equal the logits' leading shape "
                         f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})")
    if logits.shape[-1] == 0:
        raise ValueError("logits have a vocabulary of size 0")
    check_same_device("logits", logits, index=index)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    v = logits.shape[-1]
    check_indices_in_range("index", index, v)
    return selective_log_softmax_op.dispatch(_run_kernels, logits, index, temperature=temperature)


def _run_kernels(backend, logits, index, *, temperature):
    v = logits.shape[-1]
    index_rows = flat_index(index)
    logp = selective_log_softmax_op(rows(logits, v), index_rows, options=SelectiveLogSoftmaxOptions(temperature),
                                    backend=backend)[0]
    return logp.reshape(index.shape)


registry.register(registry.OpEntry(
    name="selective_log_softmax", functional=selective_log_softmax, op=selective_log_softmax_op, benchmark="kl",
))
