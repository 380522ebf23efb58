"""fastft.ops.lora_linear: the registered LoRA-linear op, its fake, its autograd, and backend dispatch.

    y = x W^T + b + scaling * (dropout(x) A^T) B^T

Data flow. Forward returns y and u = dropout(x) A^T ([N, r], small), which backward keeps instead of
dropout(x): with p > 0 the keep-mask is drawn from a one-element int64 ``seed`` (taken from the global
generator, so ``torch.manual_seed`` reproduces it) and backward re-draws the identical mask from that
seed, so no full-size mask or dropped copy of x outlives forward. Backward (g = dy B):
    dx = dy W + s * mask'(g A),  dA = s g^T dropout(x),  dB = s dy^T u,  dW = dy^T x,  db = sum_rows dy
and computes only what autograd asks for: a frozen W (the LoRA case) never gets a gradient buffer.

Kernels (same signature on every backend):
  lora_linear_fwd(x[N,in], W[out,in], b[out]?, A[r,in], B[out,r], scaling, dropout_p, seed?) -> (y, u)
  lora_linear_bwd(dy, x, W, A, B, u, seed?, scaling, dropout_p, need_dx, need_dW, need_db, need_dA, need_dB)
      -> (dx, dW, db, dA, dB), an empty tensor for each gradient not asked for
  dropout mask(like, dropout_p, seed) -> the 0/1 keep-mask the two above draw (for tests)
Backends: "cpp" = torch.ops.fastft.*_kernel (csrc/cpu/lora.cpp: MKL for the two big GEMMs, the thin
products in csrc/cpu/_low_rank.h's register-blocked kernels, the rank-r term added in place onto the GEMM
output: no [N, out] temporary, dy read once for g and dB); "triton" = fastft.kernels.lora (one fused GEMM kernel: the base and
LoRA-down products share each loaded x tile, the LoRA-up product and dropout live in its epilogue);
"reference" = fastft.reference.lora (plain autograd, no custom op; dropout from the global generator).
The masks of different backends differ (different generators); each backend's backward uses its own
forward's mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ._eager import eager_function
from ..reference import lora as _reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SUPPORTED_BACKENDS = ("reference", "cpp", "triton")


def _kernels(backend: str):
    if backend == "triton":
        from ..kernels import lora as k

        return k.lora_linear_fwd, k.lora_linear_bwd, k.lora_dropout_mask
    ops = torch.ops.fastft
    return ops.lora_linear_fwd_kernel, ops.lora_linear_bwd_kernel, ops.lora_dropout_mask_kernel


# ------------------------------------------------------------------------------------------------
# Registered ops
# ------------------------------------------------------------------------------------------------


def _forward_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    fwd, _, _ = _kernels(backend)
    return fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


_lora_linear_op = torch.library.custom_op("fastft::lora_linear", _forward_impl, mutates_args=())


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


def _backward_impl(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
    need_dA: bool,
    need_dB: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, bwd, _ = _kernels(backend)
    return bwd(grad_y.contiguous(), x, weight, lora_A, lora_B, u, seed, scaling, dropout_p,
               need_dx, need_dweight, need_dbias, need_dA, need_dB)


_lora_linear_backward_op = torch.library.custom_op("fastft::lora_linear_backward", _backward_impl, mutates_args=())


@_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, u, seed, scaling, dropout_p, need_dx, need_dweight, need_dbias, need_dA,
      need_dB, backend):
    def maybe(flag, like):
        return torch.empty_like(like) if flag else x.new_empty((0,))

    return (maybe(need_dx, x), maybe(need_dweight, weight), x.new_empty((weight.shape[0],) if need_dbias else (0,)),
            maybe(need_dA, lora_A), maybe(need_dB, lora_B))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, u = output
    ctx.options = (scaling, dropout_p)
    ctx.backend = backend
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, seed)
    ctx.backward_fn = _lora_linear_backward_op


def _backward(ctx, grad_y, _grad_u):
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    need_dx, need_dweight, need_dbias, need_dA, need_dB = (ctx.needs_input_grad[i] for i in range(5))
    dx, dweight, dbias, dA, dB = ctx.backward_fn(
        grad_y, x, weight, lora_A, lora_B, u, seed, *ctx.options,
        need_dx, need_dweight, need_dbias, need_dA, need_dB, ctx.backend,
    )
    return (dx if need_dx else None, dweight if need_dweight else None, dbias if need_dbias else None,
            dA if need_dA else None, dB if need_dB else None, None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# Eager mode skips torch.library's Python dispatch (~0.5 ms a call); torch.compile uses the registered op.
_EagerLoRALinear = eager_function("_EagerLoRALinear", _forward_impl, _setup_context, _backward_impl, _backward)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if dims and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    _check_tensor("x", x, 0)
    if x.dim() == 0:
        raise ValueError("x must have a feature dimension (shape [..., in_features]), got a 0-dim tensor")
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight {tuple(weight.shape)} "
                         f"expects {in_features}")
    if rank == 0:
        raise ValueError("lora_A has rank 0 (shape [0, in_features]); r must be >= 1")
    if tuple(lora_A.shape) != (rank, in_features):
        raise ValueError(f"lora_A must have shape (r, in_features) = ({rank}, {in_features}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape (out_features, r) = ({out_features}, {rank}), got "
                         f"{tuple(lora_B.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype} (as in F.linear, they must match)")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(scaling, Tensor) or not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be a finite Python number, got {scaling!r}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def draw_seed(device: torch.device) -> Tensor:
    """A one-element int64 seed for a dropout mask, drawn from the global generator (so
    ``torch.manual_seed`` reproduces the mask), on ``device`` (no host sync on CUDA)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _reference_mask(like: Tensor, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    gen = None
    if seed is not None:
        gen = torch.Generator(device=like.device).manual_seed(int(seed.reshape(-1)[0]))
    return torch.empty_like(like).bernoulli_(1.0 - dropout_p, generator=gen)


def dropout_mask(like: Tensor, dropout_p: float, seed: Tensor, backend: str) -> Tensor:
    """The 0/1 keep-mask (``like``'s shape and dtype) that ``backend`` draws for ``seed``. For tests."""
    if backend == "reference":
        return _reference_mask(like, dropout_p, seed)
    _, _, mask = _kernels(backend)
    return mask(like.reshape(-1, like.shape[-1]), float(dropout_p), seed).reshape(like.shape)


def select_backend(x: Tensor) -> str:
    backend = _backend.select(x.device.type, SUPPORTED_BACKENDS)
    if backend == "triton" and x.dtype == torch.float64:
        backend = "reference"  # Triton's dot has no fp64 on every target; keep fp64 exact
    return backend


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T`` with forward and backward fused.

    x [..., in]; weight [out, in] and bias [out] (or None) in x's dtype; lora_A [r, in], lora_B [out, r]
    (cast to x's dtype for the product when they differ, e.g. fp32 adapters on a bf16 model, as PEFT
    keeps them; their gradients come back in their own dtype). Dropout (only when ``training`` and
    ``dropout_p > 0``) applies to the LoRA branch's input, as in PEFT. ``seed`` (one-element int64
    tensor) fixes the dropout mask; by default it is drawn from the global generator. Gradients: x, W,
    b, A, B each only when it requires grad.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    backend = select_backend(x)
    lora_A = lora_A.to(x.dtype)
    lora_B = lora_B.to(x.dtype)
    if backend == "reference":
        mask = _reference_mask(x, p, seed) if p > 0 else None
        return _reference.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), dropout_p=p, dropout_mask=mask)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if p > 0 and seed is None:
        seed = draw_seed(x.device)
    elif p == 0:
        seed = None
    args = (x2, weight, bias, lora_A, lora_B, float(scaling), p, seed, backend)
    y = _lora_linear_op(*args)[0] if torch.compiler.is_compiling() else _EagerLoRALinear.apply(*args)
    return y.reshape(*lead, weight.shape[0])
