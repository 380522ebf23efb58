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
from .._checks import check_float_tensor, check_same_device, check_same_dtype
from .._define import define_op, standard_backends

__all__ = ["swiglu"]

_KERNELS = ("swiglu_fwd_kernel", "swiglu_bwd_kernel")


def _forward(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from ..kernels.swiglu import swiglu_fwd

        return swiglu_fwd(gate, up)
    return torch.ops.fastft.swiglu_fwd_kernel(gate, up)


def _fake(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _backward_impl(grad_out: Tensor, gate: Tensor, up: Tensor, need_gate: bool, need_up: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(d_gate, d_up); each an empty (0,) tensor when not needed."""
    if backend == "triton":
        from ..kernels.swiglu import swiglu_bwd

        return swiglu_bwd(grad_out, gate, up, need_gate, need_up)
    return torch.ops.fastft.swiglu_bwd_kernel(grad_out, gate, up, need_gate, need_up)


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
    backends=standard_backends(_KERNELS),
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
    backend = swiglu_op.select(gate)
    if backend == "reference":
        return _reference.swiglu(gate, up)
    return swiglu_op(gate.contiguous(), up.contiguous(), backend=backend)


registry.register(registry.OpEntry(
    name="swiglu", functional=swiglu, op=swiglu_op, benchmark="swiglu",
))
