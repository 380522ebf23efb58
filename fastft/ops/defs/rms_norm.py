"""fastft.ops.rms_norm: fused RMSNorm, forward and backward, over the last dimension.

    y = x * rsqrt(mean(x^2, -1) + eps) * (offset + weight)

Kernels (same contract on every backend; "cpp" torch.ops.fastft.* from csrc/cpu/rms_norm.cpp, "cuda" the same
schemas from csrc/cuda/rms_norm.cu, "triton" fastft.kernels.rms_norm, "reference" fastft.reference.rms_norm
with plain autograd):
  rms_norm_fwd(x [N, H], weight [H], eps, offset, gemma) -> (y [N, H], rstd [N] f32)
  rms_norm_bwd(grad_y, x, weight, rstd, offset, gemma, need_input, need_weight) -> (dx, dw)
Forward keeps x, the weight and one fp32 number per row (rstd); backward recomputes the normalised row from
them. dw is summed per block of rows into fp32 partials and reduced once.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from ...reference import rms_norm as _reference
from .. import registry
from ..checks import check_float_tensor, check_number, check_same_device, rows
from .._define import accumulator_dtype, define_op, extension_kernels, standard_backends, triton_kernels

__all__ = ["CASTING_MODES", "RMSNormOptions", "rms_norm"]

CASTING_MODES = _reference.CASTING_MODES


@dataclass(frozen=True)
class RMSNormOptions:
    eps: float = 1e-6
    offset: float = 0.0  # the scale is offset + weight (Gemma: 1 + weight)
    casting_mode: str = "llama"  # "llama" | "gemma": see fastft.reference.rms_norm

    @property
    def gemma(self) -> bool:
        return self.casting_mode == "gemma"


def _output_dtype(x: Tensor, weight: Tensor, options: RMSNormOptions) -> torch.dtype:
    # Llama multiplies the weight onto the normalised x in the promoted dtype (fp32 weight, bf16 x -> fp32).
    return x.dtype if options.gemma else torch.promote_types(x.dtype, weight.dtype)


def _extension_kernels(backend) -> SimpleNamespace:
    kernels = extension_kernels(fwd="rms_norm_fwd_kernel", bwd="rms_norm_bwd_kernel")(backend)
    fwd = kernels.fwd
    # The Triton launcher takes the output dtype; the C++/CUDA kernels derive the same one (_output_dtype) themselves.
    kernels.fwd = lambda x, weight, eps, offset, gemma, out_dtype: fwd(x, weight, eps, offset, gemma)
    return kernels


def _forward(x: Tensor, weight: Tensor, options: RMSNormOptions, backend: str) -> tuple[Tensor, Tensor]:
    return rms_norm_op.kernels(backend).fwd(x, weight, options.eps, options.offset, options.gemma,
                                            _output_dtype(x, weight, options))


def _fake(x, weight, options, backend):
    y = x.new_empty(x.shape, dtype=_output_dtype(x, weight, options))
    return y, x.new_empty((x.shape[0],), dtype=accumulator_dtype(x.dtype))


def _backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, need_input: bool, need_weight: bool,
                   options: RMSNormOptions, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dw); each an empty (0,) tensor when not needed."""
    return rms_norm_op.kernels(backend).bwd(grad_y, x, weight, rstd, options.offset, options.gemma, need_input,
                                            need_weight)


def _backward_fake(grad_y, x, weight, rstd, need_input, need_weight, options, backend):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_input else x.new_empty((0,))
    dw = torch.empty_like(weight) if need_weight else weight.new_empty((0,))
    return dx, dw


def _setup(ctx, inputs, outputs):
    x, weight = inputs
    ctx.save_for_backward(x, weight, outputs[1])


def _backward(ctx, grad_y):
    x, weight, rstd = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = ctx.run_backward(grad_y.contiguous(), x, weight, rstd, need_input, need_weight)
    return (dx if need_input else None), (dw if need_weight else None)


rms_norm_op = define_op(
    "rms_norm", forward=_forward, fake=_fake, setup=_setup, backward=_backward, backward_impl=_backward_impl,
    backward_fake=_backward_fake, options=RMSNormOptions,
    reference=_reference.rms_norm,
    backends=standard_backends(_extension_kernels, triton_kernels("rms_norm", fwd="rms_norm_fwd", bwd="rms_norm_bwd")),
)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             casting_mode: str = "llama") -> Tensor:
    """RMSNorm over the last dimension of ``x`` with a ``weight`` of that size, forward and backward fused.

    ``casting_mode="llama"`` (default) is Hugging Face's LlamaRMSNorm to the rounding: statistics in fp32, the
    normalised x cast back to x's dtype, then multiplied by ``offset + weight`` in the promoted dtype of x and the
    weight. ``"gemma"`` keeps everything in fp32 and casts the output to x's dtype (GemmaRMSNorm with
    ``offset=1``). Backward computes in fp32 without intermediate rounding.
    """
    check_float_tensor("x", x, min_dim=1)
    check_float_tensor("weight", weight, dim=1)
    hidden = x.shape[-1]
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} elements but x's last dimension is {hidden} "
                         f"(x {tuple(x.shape)})")
    check_same_device("x", x, weight=weight)
    eps = check_number("eps", eps, low=0.0)
    offset = check_number("offset", offset)
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    return rms_norm_op.dispatch(_run_kernels, x, weight, eps, offset=offset, casting_mode=casting_mode)


def _run_kernels(backend, x, weight, eps, *, offset, casting_mode):
    hidden = x.shape[-1]
    # An fp64 weight on lower-precision x (output fp64 in llama mode) and empty rows stay with the reference.
    if (weight.dtype == torch.float64 and x.dtype != torch.float64) or hidden == 0:
        return rms_norm_op.reference(x, weight, eps, offset=offset, casting_mode=casting_mode)
    options = RMSNormOptions(eps, offset, casting_mode)
    y, _ = rms_norm_op(rows(x, hidden), weight, options=options, backend=backend)
    return y.reshape(x.shape)


registry.register(registry.OpEntry(
    name="rms_norm", functional=rms_norm, op=rms_norm_op, benchmark="rms_norm",
))
