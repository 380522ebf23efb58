"""fastft.ops.swiglu: SwiGLU's gated product ``silu(gate) * up``, forward and backward fused.

Kernels (same contract on every backend; "cpp" torch.ops.fastft.* from csrc/cpu/swiglu.cpp, "cuda" the same
schemas from csrc/cuda/swiglu.cu, "triton" fastft.kernels.swiglu, "reference" fastft.reference.swiglu with
plain autograd), on contiguous tensors of one shape and dtype:
  swiglu_fwd(gate, up) -> out
  swiglu_bwd(grad_out, gate, up, need_gate, need_up) -> (d_gate, d_up)
Forward keeps only gate and up; backward recomputes sigmoid(gate) (as Liger-Kernel's LigerSiLUMulFunction), so
the eager path's silu(gate) activation is never stored.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...reference import swiglu as _reference
from .. import registry
from ..checks import check_float_tensor, check_same_device, check_same_dtype
from .._define import define_op, extension_kernels, standard_backends, triton_kernels

__all__ = ["swiglu"]

def _forward(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return swiglu_op.kernels(backend).fwd(gate, up)


def _fake(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _backward_impl(grad_out: Tensor, gate: Tensor, up: Tensor, need_gate: bool, need_up: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(d_gate, d_up); each an empty (0,) tensor when not needed."""
    return swiglu_op.kernels(backend).bwd(grad_out, gate, up, need_gate, need_up)


def _backward_fake(grad_out, gate, up, need_gate, need_up, backend):
    def grad(needed):
        return torch.empty_like(gate, memory_format=torch.contiguous_format) if needed else gate.new_empty((0,))

    return grad(need_gate), grad(need_up)


def _setup(ctx, inputs, outputs):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_gate, d_up = ctx.run_backward(grad_out.contiguous(), gate, up, need_gate, need_up)
    return (d_gate if need_gate else None), (d_up if need_up else None)


swiglu_op = define_op(
    "swiglu", forward=_forward, fake=_fake, setup=_setup, backward=_backward, backward_impl=_backward_impl,
    backward_fake=_backward_fake,
    reference=_reference.swiglu,
    backends=standard_backends(extension_kernels(fwd="swiglu_fwd_kernel", bwd="swiglu_bwd_kernel"),
                               triton_kernels("swiglu", fwd="swiglu_fwd", bwd="swiglu_bwd")),
)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (the gated product between a SwiGLU MLP's projections), forward and backward fused.

    ``gate`` and ``up`` have one shape and one dtype. Values match eager ``F.silu(gate) * up`` to the rounding:
    silu is rounded to the inputs' dtype before the product, as eager does between its two ops; backward computes
    in fp32 (fp64 for fp64) without intermediate rounding.
    """
    check_float_tensor("gate", gate)
    check_float_tensor("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    check_same_dtype("gate", gate, up=up)
    check_same_device("gate", gate, up=up)
    return swiglu_op.dispatch(_run_kernels, gate, up)


def _run_kernels(backend, gate, up):
    return swiglu_op(gate.contiguous(), up.contiguous(), backend=backend)


registry.register(registry.OpEntry(
    name="swiglu", functional=swiglu, op=swiglu_op, benchmark="swiglu",
))
