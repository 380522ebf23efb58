"""fastft.ops.adapter: the fused bottleneck adapter, its registered ops, autograd and dispatch.

    y = x + scale * (h @ W_up^T + b_up),   h = dropout(act(pre)),   pre = x @ W_down^T + b_down

Data flow (x: [N, H], r = bottleneck, usually 64). Triton backend: cuBLAS GEMMs with Triton epilogues on
the [N, r] bottleneck (kernels/adapter.py); C++ backend: the same steps run by row blocks that stay in
L2 between the GEMMs (csrc/cpu/adapter.cpp), so x and g are read from memory once:
  forward   pre = addmm(b_down, x, W_down^T)                     bias fused into the GEMM
            h1  = [act(pre) * mask * keep_scale | 1]             epilogue kernel, one pass over [N, r]
            y   = addmm(x, h1, [W_up | b_up]^T, alpha=scale)     bias + scale + residual in one GEMM
  backward  gh  = g @ W_up                                        [N, r]
            gp, h1 = epilogue_bwd(gh, pre)                        scale * gh * act'(pre) * mask * keep_scale,
                                                                  h1 recomputed (mask regenerated from the seed)
            dx  = addmm(g, gp, W_down)                            residual gradient fused
            [dW_up | db_up] = scale * g^T @ h1                    one GEMM for weight and bias
            dW_down = gp^T @ x,  db_down = sum(gp)
Saved for backward: pre [N, r] and the seed; never a full-width activation besides x itself (which the
down-projection's weight gradient needs, as in eager). The eager block stores act/dropout outputs and
a mask and makes 3-4 extra full-width passes (bias, scale, residual add, gradient accumulation).

Dropout masks come from a counter-based hash of (seed, element index) (fastft.reference.adapter); the
seed is drawn from torch's default generator, so ``torch.manual_seed`` makes runs reproducible and the
reference, C++ and Triton backends drop the same elements.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ._eager import eager_function
from ..reference import adapter as _ref

ACTIVATIONS = tuple(_ref.ACTIVATIONS)
_SUPPORTED = ("reference", "cpp", "triton")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _epilogues(backend: str):
    """The element-wise bottleneck kernels of the GEMM-composed path (the Triton backend)."""
    from ..kernels import adapter as k

    return k.adapter_act_dropout_fwd, k.adapter_act_dropout_bwd


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ------------------------------------------------------------------------------------------------
# Registered ops
# ------------------------------------------------------------------------------------------------


def _forward_impl(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Optional[Tensor],
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    seed: Tensor,
    activation: int,
    drop_threshold: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "cpp":  # the whole block fused by row tiles in C++ (csrc/cpu/adapter.cpp)
        return torch.ops.fastft.adapter_fwd_kernel(
            x, down_weight, down_bias, up_weight, up_bias, seed, activation, drop_threshold, scale
        )
    fwd, _ = _epilogues(backend)
    if down_bias is not None:
        pre = torch.addmm(down_bias, x, down_weight.t())
    else:
        pre = torch.mm(x, down_weight.t())
    has_up_bias = up_bias is not None
    h = fwd(pre.contiguous(), seed, activation, drop_threshold, has_up_bias)
    w = torch.cat([up_weight, up_bias[:, None]], dim=1) if has_up_bias else up_weight
    y = torch.addmm(x, h, w.t(), alpha=scale)
    return y, pre


_adapter_op = torch.library.custom_op("fastft::adapter", _forward_impl, mutates_args=())


@_adapter_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, seed, activation, drop_threshold, scale, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((x.shape[0], down_weight.shape[0]))


def _backward_impl(
    grad: Tensor,
    x: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    pre: Tensor,
    seed: Tensor,
    activation: int,
    drop_threshold: int,
    scale: float,
    has_down_bias: bool,
    has_up_bias: bool,
    need_input: bool,
    need_down: bool,
    need_up: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW_down, db_down, dW_up, db_up); each is an empty (0,) tensor when not needed."""
    if backend == "cpp":
        outs = torch.ops.fastft.adapter_bwd_kernel(
            grad, x, down_weight, up_weight, pre, seed, activation, drop_threshold, scale,
            has_down_bias, has_up_bias, need_input, need_down, need_up,
        )
        # Zero-size placeholders from C++ can share one StorageImpl, which the custom-op aliasing check
        # rejects; give each not-computed gradient its own.
        computed = (need_input, need_down, need_down and has_down_bias, need_up, need_up and has_up_bias)
        return tuple(o if c else _empty(x) for o, c in zip(outs, computed))
    _, bwd = _epilogues(backend)
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
        dwu_aug = torch.mm(grad.t(), h).mul_(scale)  # [H, r (+1)]: the last column is db_up
        dwu = dwu_aug[:, :r].contiguous() if has_up_bias else dwu_aug
        if has_up_bias:
            dbu = dwu_aug[:, r].contiguous()
    return dx, dwd, dbd, dwu, dbu


_adapter_backward_op = torch.library.custom_op("fastft::adapter_backward", _backward_impl, mutates_args=())


@_adapter_backward_op.register_fake
def _(grad, x, down_weight, up_weight, pre, seed, activation, drop_threshold, scale, has_down_bias, has_up_bias,
      need_input, need_down, need_up, backend):
    e = x.new_empty((0,))
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_input else e
    dwd = down_weight.new_empty(down_weight.shape) if need_down else e
    dbd = x.new_empty((down_weight.shape[0],)) if need_down and has_down_bias else x.new_empty((0,))
    dwu = up_weight.new_empty(up_weight.shape) if need_up else x.new_empty((0,))
    dbu = x.new_empty((up_weight.shape[0],)) if need_up and has_up_bias else x.new_empty((0,))
    return dx, dwd, dbd, dwu, dbu


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, seed, activation, drop_threshold, scale, backend = inputs
    _, pre = output
    ctx.save_for_backward(x, down_weight, up_weight, pre, seed)
    ctx.options = (activation, drop_threshold, scale, down_bias is not None, up_bias is not None)
    ctx.backend = backend
    ctx.backward_fn = _adapter_backward_op


def _backward(ctx, grad_y, _grad_pre):
    x, down_weight, up_weight, pre, seed = ctx.saved_tensors
    activation, drop_threshold, scale, has_down_bias, has_up_bias = ctx.options
    need = ctx.needs_input_grad
    need_input, need_down, need_up = need[0], need[1] or need[2], need[3] or need[4]
    dx, dwd, dbd, dwu, dbu = ctx.backward_fn(
        grad_y, x, down_weight, up_weight, pre, seed, activation, drop_threshold, scale,
        has_down_bias, has_up_bias, need_input, need_down, need_up, ctx.backend,
    )
    return (
        dx if need[0] else None,
        dwd if need[1] else None,
        dbd if need[2] else None,
        dwu if need[3] else None,
        dbu if need[4] else None,
        None, None, None, None, None,
    )


_adapter_op.register_autograd(_backward, setup_context=_setup_context)


# Eager mode skips torch.library's Python dispatch (~0.5 ms a call); torch.compile uses the registered op.
_EagerAdapter = eager_function("_EagerAdapter", _forward_impl, _setup_context, _backward_impl, _backward)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(x, down_weight, down_bias, up_weight, up_bias, activation, dropout_p, scale) -> None:
    named = {"x": x, "down_weight": down_weight, "up_weight": up_weight}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("down_bias", down_bias), ("up_bias", up_bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have a hidden dimension (shape [..., H]), got a 0-dim tensor")
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
    for name, t in (("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight),
                    ("up_bias", up_bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; the adapter's parameters must match x's dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if activation not in _ref.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    p = float(dropout_p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale}")


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
    backend = _backend.select(x.device.type, supported=_SUPPORTED)
    if backend != "cpp" and x.dtype == torch.float64:
        backend = "reference"  # the Triton epilogue computes in fp32; keep fp64 exact
    threshold = _ref.drop_threshold(dropout_p) if training else 0
    seed = _ref.draw_seed(x.device) if threshold > 0 else None
    if backend == "reference":
        return _ref.adapter(
            x, down_weight, down_bias, up_weight, up_bias, activation=activation,
            dropout_p=dropout_p, training=training, scale=scale, seed=seed,
        )
    if seed is None:
        seed = torch.zeros((), dtype=torch.int64, device=x.device)  # never read without dropout
    hidden = x.shape[-1]
    args = (x.reshape(-1, hidden), down_weight, down_bias, up_weight, up_bias, seed, _ref.ACTIVATIONS[activation],
            threshold, float(scale), backend)
    if torch.compiler.is_compiling():
        y, _ = _adapter_op(*args)
    else:
        y = _EagerAdapter.apply(*args)
    return y.reshape(x.shape)
