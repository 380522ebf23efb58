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
output: no [N, out] temporary, dy read once for g and dB); "triton" = fastft.kernels.lora (one fused GEMM
kernel: the base and LoRA-down products share each loaded x tile, the LoRA-up product and dropout live in
its epilogue);
"reference" = fastft.reference.lora (plain autograd, no custom op). Every backend draws the same
counter-based dropout mask for a seed (kernels/dropout.py, csrc/_dropout.h; tests/ops/test_dropout.py).
"cuda" calls the same torch.ops.fastft.*_kernel schemas as "cpp"; the dispatcher picks the CUDA
implementation (csrc/cuda) for CUDA tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...kernels import dropout as kernel_dropout
from ...reference import lora as _reference
from .. import registry
from ..checks import check_float_tensor, check_number, check_same_device, check_same_dtype
from ... import backend as _backend
from .._define import define_op, extension_kernels, standard_backends, triton_kernels



@dataclass(frozen=True)
class LoRAOptions:
    scaling: float = 1.0
    dropout_p: float = 0.0


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             seed: Optional[Tensor], options: LoRAOptions, backend: str) -> tuple[Tensor, Tensor]:
    return lora_linear_op.kernels(backend).fwd(x, weight, bias, lora_A, lora_B, options.scaling, options.dropout_p, seed)


def _fake(x, weight, bias, lora_A, lora_B, seed, options, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


def _backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                   seed: Optional[Tensor], needs: list[bool], options: LoRAOptions,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return lora_linear_op.kernels(backend).bwd(grad_y.contiguous(), x, weight, lora_A, lora_B, u, seed, options.scaling, options.dropout_p, *needs)


def _backward_fake(grad_y, x, weight, lora_A, lora_B, u, seed, needs, options, backend):
    need_dx, need_dweight, need_dbias, need_dA, need_dB = needs

    def maybe(flag, like):
        return torch.empty_like(like) if flag else x.new_empty((0,))

    return (maybe(need_dx, x), maybe(need_dweight, weight), x.new_empty((weight.shape[0],) if need_dbias else (0,)),
            maybe(need_dA, lora_A), maybe(need_dB, lora_B))


def _setup(ctx, inputs, outputs):
    x, weight, bias, lora_A, lora_B, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, outputs[1], seed)


def _backward(ctx, grad_y):
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in range(5)]
    grads = ctx.run_backward(grad_y, x, weight, lora_A, lora_B, u, seed, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


# ------------------------------------------------------------------------------------------------
# Which GPU path: a byte / flop plan (a PREDICTION from counted bytes and flops, not a measurement)
# ------------------------------------------------------------------------------------------------

# Inputs of the prediction, each with its source (the team's CONVENTIONS.md, "GPU work without a GPU").
GPU_BANDWIDTH = 3.35e12     # bytes/s, H100 SXM peak HBM3 (datasheet)
CUBLAS_GEMM_RATE = 790e12   # flop/s, bf16 dense GEMM, measured on the H200 (2026-12-04)
# The one GPU figure of our Triton GEMM: the fused Triton LoRA forward took 2.0x cuBLAS's frozen base GEMM
# (H200, bf16, 8192 x 4096 -> 4096, r = 16; issue 20). The rank-r work is < 1% of its flops, so the factor is
# charged to the GEMM's rate. The current kernel (rank-r product out of the K loop) has not run on a GPU yet.
TRITON_GEMM_RATE = CUBLAS_GEMM_RATE / 2.0
LAUNCH_SECONDS = 4e-6       # per kernel launch, a typical CUDA figure
BENCHMARK_SHAPE = (8192, 4096, 4096, 16)  # tokens, in, out, r: benchmarks/bench_lora.py's CUDA shape


@dataclass(frozen=True)
class KernelPlan:
    name: str
    flops: float
    bytes: float
    rate: float  # flop/s this kernel's arithmetic is predicted to run at

    def seconds(self) -> float:
        return LAUNCH_SECONDS + max(self.flops / self.rate, self.bytes / GPU_BANDWIDTH)


def lora_forward_plan(tokens: int, d_in: int, d_out: int, rank: int, itemsize: int = 2) -> dict:
    """Per GPU path of the LoRA forward ("triton", "cuda"): the kernels it launches, with the flops they do and
    the bytes they must move at the least (each operand read once, each output written once). A prediction."""
    n, e = tokens, itemsize
    x, w, y = n * d_in * e, d_out * d_in * e, n * d_out * e
    u, a, b = n * rank * e, rank * d_in * e, d_out * rank * e
    base, down, up = 2.0 * n * d_in * d_out, 2.0 * n * d_in * rank, 2.0 * n * rank * d_out
    # The thin down product is memory-bound in both paths (reads x once); both are our kernels.
    down_kernel = KernelPlan("down: u = drop(x) A^T", down, x + a + u, CUBLAS_GEMM_RATE)
    return {
        "triton": [down_kernel,
                   KernelPlan("GEMM x W^T + s u B^T (epilogue)", base + up, x + w + u + b + y, TRITON_GEMM_RATE)],
        "cuda": [down_kernel,
                 KernelPlan("cuBLAS y = b + s u B^T", up, u + b + y, CUBLAS_GEMM_RATE),
                 KernelPlan("cuBLAS y += x W^T (beta = 1)", base, x + w + 2 * y, CUBLAS_GEMM_RATE)],
    }


def predicted_seconds(plan: list) -> float:
    return sum(k.seconds() for k in plan)


def planned_cuda_default(shape: tuple = BENCHMARK_SHAPE) -> tuple:
    """(the GPU path the plan predicts faster at ``shape``, a one-line reason for ``fastft info``)."""
    plans = lora_forward_plan(*shape)
    times = {name: predicted_seconds(plan) for name, plan in plans.items()}
    best = min(times, key=times.get)
    other = max(times, key=times.get)
    extra_bytes = sum(k.bytes for k in plans["cuda"]) - sum(k.bytes for k in plans["triton"])
    reason = (f"predicted (byte/flop plan, not measured) {times[best] * 1e3:.3f} ms vs {other} "
              f"{times[other] * 1e3:.3f} ms for the bf16 forward at {shape[0]}x{shape[1]}->{shape[2]}, r={shape[3]}: "
              f"cuBLAS GEMMs at {CUBLAS_GEMM_RATE / 1e12:.0f} TFLOP/s vs the Triton GEMM's last measured "
              f"{TRITON_GEMM_RATE / 1e12:.0f}, against the cuda path's {extra_bytes / 1e6:.0f} MB more traffic "
              f"(y written twice, read once by the beta = 1 GEMM)")
    return best, reason


lora_linear_op = define_op(
    "lora_linear", forward=_forward, fake=_fake, setup=_setup, backward=_backward, backward_impl=_backward_impl,
    backward_fake=_backward_fake, options=LoRAOptions,
    reference=_reference.lora_linear,
    backends=standard_backends(
        extension_kernels(fwd="lora_linear_fwd_kernel", bwd="lora_linear_bwd_kernel",
                          dropout_mask="lora_dropout_mask_kernel"),
        triton_kernels("lora", fwd="lora_linear_fwd", bwd="lora_linear_bwd", dropout_mask="lora_dropout_mask")),
)
_CUDA_DEFAULT, _CUDA_DEFAULT_REASON = planned_cuda_default()  # the plan is evaluated once, at import
_backend.prefer("lora_linear", "cuda", (_CUDA_DEFAULT, "triton", "cuda"), _CUDA_DEFAULT_REASON)


# ------------------------------------------------------------------------------------------------
# Public functional
# ------------------------------------------------------------------------------------------------


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    check_float_tensor("x", x, min_dim=1)
    check_float_tensor("weight", weight, dim=2)
    check_float_tensor("lora_A", lora_A, dim=2)
    check_float_tensor("lora_B", lora_B, dim=2)
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight {tuple(weight.shape)} "
                         f"expects {in_features}")
    if rank == 0:
        raise ValueError("lora_A has rank 0 (shape [0, in_features]); r must be >= 1")
    if tuple(lora_A.shape) != (rank, in_features):
        raise ValueError(f"lora_A must have shape (r, in_features) = ({rank}, {in_features}), got "
                         f"{tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape (out_features, r) = ({out_features}, {rank}), got "
                         f"{tuple(lora_B.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias, dim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    check_same_dtype("x", x, weight=weight, bias=bias)
    check_same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    check_number("scaling", scaling)
    check_number("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)


def dropout_mask(like: Tensor, dropout_p: float, seed: Tensor, backend: str) -> Tensor:
    """The 0/1 keep-mask (``like``'s shape and dtype) that ``backend`` draws for ``seed``. For tests."""
    if backend == "reference":
        return kernel_dropout.keep_mask(like.shape, dropout_p, seed, device=like.device).to(like.dtype)
    return lora_linear_op.kernels(backend).dropout_mask(like.reshape(-1, like.shape[-1]), float(dropout_p), seed).reshape(like.shape)


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
    tensor) fixes the dropout mask (the same on every backend); by default it is drawn from the global
    generator. Gradients: x, W, b, A, B each only when it requires grad.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    lora_A = lora_A.to(x.dtype)
    lora_B = lora_B.to(x.dtype)
    if p > 0 and seed is None:
        seed = kernel_dropout.draw_seed(x.device)
    elif p > 0:
        seed = kernel_dropout.seed_on(seed, x)  # a host seed would reach a CUDA kernel as a host pointer
    else:
        seed = None
    return lora_linear_op.dispatch(_run_kernels, x, weight, bias, lora_A, lora_B, float(scaling), dropout_p=p, seed=seed)


def _run_kernels(backend, x, weight, bias, lora_A, lora_B, scaling, *, dropout_p, seed):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = lora_linear_op(x2, weight, bias, lora_A, lora_B, seed, options=LoRAOptions(scaling, dropout_p),
                       backend=backend)[0]
    return y.reshape(*lead, weight.shape[0])


registry.register(registry.OpEntry(
    name="lora_linear", functional=lora_linear, op=lora_linear_op, benchmark="lora",
))
