"""fastft.ops.adapter: the fused bottleneck adapter, its registered ops, autograd and dispatch.

    y = x + scale * (h @ W_up^T + b_up),   h = dropout(act(pre)),   pre = x @ W_down^T + b_down

Data flow (x: [N, H], r = bottleneck, usually 64). Triton backend: cuBLAS GEMMs with Triton epilogues on
the [N, r] bottleneck (kernels/adapter.py); C++ backend: the same steps run by row blocks that stay in
L2 between the GEMMs (csrc/cpu/adapter.cpp), so x and g are read from memory once:
  forward   pre = addmm(b_down, x, W_down^T)                     bias fused into the GEMM
            h1  = [act(pre) * mask * keep_scale | 1 | 0..]       epilogue kernel, one pass over [N, r]; rows
                                                                  padded with zeros to a multiple of 8
            y   = addmm(x, h1, [W_up | b_up | 0..]^T, alpha=scale)  bias + scale + residual in one GEMM
  backward  gh  = g @ W_up                                        [N, r]
            gp, h1 = epilogue_bwd(gh, pre)                        scale * gh * act'(pre) * mask * keep_scale,
                                                                  h1 recomputed (mask regenerated from the seed)
            dx  = addmm(g, gp, W_down)                            residual gradient fused
            [dW_up | db_up] = scale * g^T @ h1                    one GEMM for weight and bias
            dW_down = gp^T @ x,  db_down = sum(gp)
Saved for backward: pre [N, r] and the seed; never a full-width activation besides x itself (which the
down-projection's weight gradient needs, as in eager). The eager block stores act/dropout outputs and
a mask and makes 3-4 extra full-width passes (bias, scale, residual add, gradient accumulation).

Dropout masks come from a counter-based hash of (seed, element index) (kernels/dropout.py,
csrc/_dropout.h); the seed is drawn from torch's default generator, so ``torch.manual_seed`` makes runs
reproducible and the reference, C++ and Triton backends drop the same elements. "cuda" calls the same
torch.ops.fastft.adapter_*_kernel schemas as "cpp"; the dispatcher picks the CUDA implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ...kernels import dropout as kernel_dropout
from ...reference import adapter as _ref
from .. import registry
from ..checks import check_float_tensor, check_number, check_optional_tensor, check_same_device, check_tensor
from .._define import define_op, extension_kernels, standard_backends, triton_kernels

ACTIVATIONS = tuple(_ref.ACTIVATIONS)


@dataclass(frozen=True)
class AdapterOptions:
    activation: int = 0  # index into ACTIVATIONS
    drop_threshold: int = 0  # dropout: 24-bit threshold (kernels/dropout.py); 0 = no dropout
    scale: float = 1.0


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# Kernel sets. "cpp"/"cuda": the whole block in one extension kernel (fused by row tiles, csrc/cpu/adapter.cpp);
# "triton": GEMMs composed with the element-wise bottleneck epilogues of kernels/adapter.py (below). Both
# take the same arguments: fwd(x, W_down, b_down, W_up, b_up, seed, activation, drop_threshold, scale) -> (y, pre),
# bwd(grad, x, W_down, W_up, pre, seed, activation, drop_threshold, scale, has_down_bias, has_up_bias,
#     need_input, need_down, need_up) -> (dx, dW_down, db_down, dW_up, db_up).
_extension_kernels = extension_kernels(fwd="adapter_fwd_kernel", bwd="adapter_bwd_kernel")


def _triton_kernels(backend):
    epilogues = triton_kernels("adapter", act_dropout_fwd="adapter_act_dropout_fwd",
                               act_dropout_bwd="adapter_act_dropout_bwd")(backend)
    return SimpleNamespace(fwd=lambda *args: _composed_forward(epilogues.act_dropout_fwd, *args),
                           bwd=lambda *args: _composed_backward(epilogues.act_dropout_bwd, *args))


def _composed_forward(fwd, x, down_weight, down_bias, up_weight, up_bias, seed, activation, drop_threshold, scale):
    if down_bias is not None:
        pre = torch.addmm(down_bias, x, down_weight.t())
    else:
        pre = torch.mm(x, down_weight.t())
    has_up_bias = up_bias is not None
    h = fwd(pre.contiguous(), seed, activation, drop_threshold, has_up_bias)  # [N, width]
    y = torch.addmm(x, h, _padded_up(up_weight, up_bias, h.shape[1]).t(), alpha=scale)
    return y, pre


def _composed_backward(bwd, grad, x, down_weight, up_weight, pre, seed, activation, drop_threshold, scale,
                       has_down_bias, has_up_bias, need_input, need_down, need_up):
    r = pre.shape[1]
    grad_h = torch.mm(grad, up_weight)
    grad_pre, h = bwd(grad_h, pre.contiguous(), seed, activation, drop_threshold, scale, has_up_bias, need_up)
    dx = torch.addmm(grad, grad_pre, down_weight) if need_input else _empty(x)
    dwd, dbd, dwu, dbu = (_empty(x) for _ in range(4))  # outputs may not alias each other
    if need_down:
        dwd = torch.mm(grad_pre.t(), x)
        if has_down_bias:
            dbd = grad_pre.sum(0)
    if need_up:
        # [H, width]: column r is db_up, the padding columns beyond are dropped (never trained)
        dwu_aug = torch.mm(grad.t(), h).mul_(scale)
        dwu = dwu_aug if dwu_aug.shape[1] == r else dwu_aug[:, :r].contiguous()
        if has_up_bias:
            dbu = dwu_aug[:, r].contiguous()
    return dx, dwd, dbd, dwu, dbu


def _forward(x: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
             seed: Tensor, options: AdapterOptions, backend: str) -> tuple[Tensor, Tensor]:
    return adapter_op.kernels(backend).fwd(x, down_weight, down_bias, up_weight, up_bias, seed, options.activation,
                                           options.drop_threshold, options.scale)


def _padded_up(up_weight: Tensor, up_bias: Optional[Tensor], width: int) -> Tensor:
    """[W_up | b_up | 0] as [H, width]: the row width of h (a multiple of 8, kernels/adapter.py padded_width),
    so both GEMM operands have 16-byte-aligned rows; the zero columns add exactly nothing."""
    r = up_weight.shape[1]
    if up_bias is None and width == r:
        return up_weight
    w = up_weight.new_zeros((up_weight.shape[0], width))
    w[:, :r] = up_weight
    if up_bias is not None:
        w[:, r] = up_bias
    return w


def _fake(x, down_weight, down_bias, up_weight, up_bias, seed, options, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((x.shape[0], down_weight.shape[0]))


def _backward_impl(grad: Tensor, x: Tensor, down_weight: Tensor, up_weight: Tensor, pre: Tensor, seed: Tensor,
                   has_down_bias: bool, has_up_bias: bool, need_input: bool, need_down: bool, need_up: bool,
                   options: AdapterOptions, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW_down, db_down, dW_up, db_up); each is an empty (0,) tensor when not needed."""
    outs = adapter_op.kernels(backend).bwd(
        grad, x, down_weight, up_weight, pre, seed, options.activation, options.drop_threshold, options.scale,
        has_down_bias, has_up_bias, need_input, need_down, need_up,
    )
    # Zero-size placeholders from C++ can share one StorageImpl, which the custom-op aliasing check
    # rejects; give each not-computed gradient its own.
    computed = (need_input, need_down, need_down and has_down_bias, need_up, need_up and has_up_bias)
    return tuple(o if c else _empty(x) for o, c in zip(outs, computed))


def _backward_fake(grad, x, down_weight, up_weight, pre, seed, has_down_bias, has_up_bias, need_input, need_down,
                   need_up, options, backend):
    e = x.new_empty((0,))
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_input else e
    dwd = down_weight.new_empty(down_weight.shape) if need_down else e
    dbd = x.new_empty((down_weight.shape[0],)) if need_down and has_down_bias else x.new_empty((0,))
    dwu = up_weight.new_empty(up_weight.shape) if need_up else x.new_empty((0,))
    dbu = x.new_empty((up_weight.shape[0],)) if need_up and has_up_bias else x.new_empty((0,))
    return dx, dwd, dbd, dwu, dbu


def _setup(ctx, inputs, outputs):
    x, down_weight, down_bias, up_weight, up_bias, seed = inputs
    ctx.save_for_backward(x, down_weight, up_weight, outputs[1], seed)
    ctx.has_bias = (down_bias is not None, up_bias is not None)


def _backward(ctx, grad_y):
    x, down_weight, up_weight, pre, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dwd, dbd, dwu, dbu = ctx.run_backward(grad_y, x, down_weight, up_weight, pre, seed, *ctx.has_bias,
                                              need[0], need[1] or need[2], need[3] or need[4])
    return tuple(g if need[i] else None for i, g in enumerate((dx, dwd, dbd, dwu, dbu))) + (None,)


adapter_op = define_op(
    "adapter", forward=_forward, fake=_fake, setup=_setup, backward=_backward, backward_impl=_backward_impl,
    backward_fake=_backward_fake, options=AdapterOptions,
    reference=_ref.adapter, backends=standard_backends(_extension_kernels, _triton_kernels),
)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(x, down_weight, down_bias, up_weight, up_bias, activation, dropout_p, scale) -> None:
    check_tensor("x", x)
    check_tensor("down_weight", down_weight)
    check_tensor("up_weight", up_weight)
    check_optional_tensor("down_bias", down_bias)
    check_optional_tensor("up_bias", up_bias)
    check_float_tensor("x", x, min_dim=1)
    hidden = x.shape[-1]
    if down_weight.dim() != 2 or up_weight.dim() != 2:
        raise ValueError(
            f"down_weight must be [r, H] and up_weight [H, r] (nn.Linear layout), got {tuple(down_weight.shape)} "
            f"and {tuple(up_weight.shape)}"
        )
    r = down_weight.shape[0]
    if r <= 0:
        raise ValueError(f"adapter_size (down_weight.shape[0]) must be > 0, got {r}")
    if down_weight.shape[1] != hidden:
        raise ValueError(
            f"hidden size mismatch: x has hidden size {hidden} but down_weight is {tuple(down_weight.shape)} "
            f"(expected [r, {hidden}])"
        )
    if tuple(up_weight.shape) != (hidden, r):
        raise ValueError(
            f"hidden size mismatch: up_weight is {tuple(up_weight.shape)}, expected ({hidden}, {r}) for x of hidden "
            f"size {hidden} and adapter size {r}"
        )
    if down_bias is not None and tuple(down_bias.shape) != (r,):
        raise ValueError(f"down_bias must have shape ({r},), got {tuple(down_bias.shape)}")
    if up_bias is not None and tuple(up_bias.shape) != (hidden,):
        raise ValueError(f"up_bias must have shape ({hidden},), got {tuple(up_bias.shape)}")
    params = {"down_weight": down_weight, "down_bias": down_bias, "up_weight": up_weight, "up_bias": up_bias}
    for name, t in params.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; the adapter's parameters must match x's dtype")
    check_same_device("x", x, **params)
    if activation not in _ref.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    check_number("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    check_number("scale", scale)


def adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Optional[Tensor],
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    *,
    activation: str = "relu",
    dropout_p: float = 0.0,
    training: bool = True,
    scale: float = 1.0,
) -> Tensor:
    """Bottleneck adapter ``x + scale * up(dropout(act(down(x))))`` over the last dimension of ``x``.

    ``down_weight`` [r, H] / ``down_bias`` [r] and ``up_weight`` [H, r] / ``up_bias`` [H] are nn.Linear
    parameters (biases may be None). ``activation``: "relu", "gelu" (erf), "gelu_tanh" or "silu".
    Dropout (probability ``dropout_p``, only when ``training``) acts on the bottleneck activation; its
    mask is drawn from torch's default generator (``torch.manual_seed`` reproduces it) and regenerated,
    not stored, for backward. Same values and gradients as the eager block up to rounding.
    """
    _check_inputs(x, down_weight, down_bias, up_weight, up_bias, activation, dropout_p, scale)
    threshold = kernel_dropout.drop_threshold(dropout_p) if training else 0
    seed = kernel_dropout.draw_seed(x.device) if threshold > 0 else None
    return adapter_op.dispatch(_run_kernels, x, down_weight, down_bias, up_weight, up_bias, activation=activation,
                               dropout_p=dropout_p, training=training, scale=scale, seed=seed)


def _run_kernels(backend, x, down_weight, down_bias, up_weight, up_bias, *, activation, dropout_p, training, scale,
                 seed):
    threshold = kernel_dropout.drop_threshold(dropout_p) if training else 0
    if seed is None:
        seed = torch.zeros((1,), dtype=torch.int64, device=x.device)  # never read without dropout
    options = AdapterOptions(_ref.ACTIVATIONS[activation], threshold, float(scale))
    y = adapter_op(x.reshape(-1, x.shape[-1]), down_weight, down_bias, up_weight, up_bias, seed, options=options,
                   backend=backend)[0]
    return y.reshape(x.shape)


registry.register(registry.OpEntry(
    name="adapter", functional=adapter, op=adapter_op, benchmark="adapter",
))
