"""Triton LoRA linear: a rank-r down kernel and one fused GEMM kernel, for forward and for the input gradient.

    forward:  y  = x W^T + b + s * (drop(x) A^T) B^T,        u = drop(x) A^T      (drop(x) = x * keep / (1-p))
    backward: dx = dy W + s * keep/(1-p) * ((dy B) A),        g = dy B
              dA = s g^T drop(x)   dB = s dy^T u   dW = dy^T x   db = sum_rows dy

Both big products are the same pair of kernels: out = X @ M (+ bias) + s * E(inner @ L2), inner = D(X) @ L1.
``_lora_down_kernel`` computes inner ([N, r], small) once per row tile; ``_lora_matmul_kernel`` is a plain
GEMM over K whose epilogue loads its row tile of inner and adds s * inner @ L2 in registers: no second pass
over the output, no [N, out] LoRA temporary, and no rank-r state held through the GEMM's K loop (an earlier
version computed inner inside the GEMM, once per column tile: ~r / BLOCK_N extra flops, and the rank-r tiles
cost registers and shared memory, 192 registers / 102 KB at sm_90, 1 CTA per SM). inner (u or g) is also
what backward needs.
  forward: X = x, M = W^T, L1 = A^T, L2 = B^T, D = dropout on X (DROP_IN)
  dx:      X = dy, M = W,  L1 = B,   L2 = A,   E = the same mask on the output (DROP_OUT)
Offsets are int64 (M has out * in elements: >= 2^31 for a LoRA'd 256k-vocabulary head).
Dropout: keep = kernels/dropout.py's counter-based hash of (seed, m * in_features + k) (the mask every
backend draws: csrc/_dropout.h, fastft/reference/dropout.py), from a one-element int64 seed tensor; backward (DROP_OUT here, and ``_lora_down_grad_kernel`` for dA) re-draws the identical
mask from the same seed and the same element offsets, so no mask or dropped copy of x is stored.
dA with dropout is ``_lora_down_grad_kernel`` (g^T @ drop(x), split over rows, partial sums reduced in
fp32); without dropout, and dB, dW, db, are single cuBLAS calls (torch.mm).

Numerics: fp32 accumulation; bf16/fp16 tiles go to tl.dot as they are on a GPU; under the CPU
interpreter (bf16 arithmetic wrong there) they are cast to fp32 first (UPCAST). fp32 dots use TF32 exactly
when torch.backends.cuda.matmul.allow_tf32 is set (``dot_precision``), as torch's own fp32 matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dropout import drop_threshold as _drop_threshold, keep as _dropout_keep, keep_scale as _keep_scale, seed_on
from ._common import bf16_by_hand, cast_for_store, device_ctx

__all__ = ["dot_precision", "lora_linear_fwd", "lora_linear_bwd", "lora_dropout_mask"]


@triton.jit
def _lora_down_kernel(
    x_ptr, l1_ptr, inner_ptr, seed_ptr, M, K, R,
    stride_xm, stride_xk, stride_l1k, stride_l1r, stride_im, stride_ir,
    drop_threshold, keep_scale,
    DROP_IN: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # inner[M, R] = D(X) @ L1, once per row tile (the GEMM kernel below reads it in its epilogue).
    rows64 = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows64 < M
    r_ok = rs < R
    if DROP_IN:
        seed = tl.load(seed_ptr)
    inner = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k64 = (k0 + ks).to(tl.int64)
        k_ok = k64 < K
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + k64[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        l1 = tl.load(l1_ptr + k64[:, None] * stride_l1k + rs[None, :] * stride_l1r,
                     mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            l1 = l1.to(tl.float32)
        if DROP_IN:
            keep = _dropout_keep(seed, rows64[:, None] * K + k64[None, :], drop_threshold)
            xt = tl.where(keep, xt.to(tl.float32) * keep_scale, 0.0).to(xt.dtype)
        inner = tl.dot(xt, l1, inner, input_precision=DOT_PRECISION)
    tl.store(inner_ptr + rows64[:, None] * stride_im + rs[None, :] * stride_ir,
             cast_for_store(inner, inner_ptr.dtype.element_ty, BF16_RNE_BY_HAND), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_matmul_kernel(
    x_ptr, m_ptr, inner_ptr, l2_ptr, bias_ptr, out_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_mk, stride_mn, stride_im, stride_ir, stride_l2r, stride_l2n,
    stride_om, stride_on,
    scaling, drop_threshold, keep_scale,
    HAS_BIAS: tl.constexpr, DROP_OUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share the column tiles of M while they sit in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    # Every offset is int64: M (the weight, [K, N] or its transpose) has K * N elements, which passes
    # 2^31 for a LoRA'd 256k-vocabulary head; x and out pass it at long contexts.
    rows64 = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols64 = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows64 < M
    col_ok = cols64 < N
    r_ok = rs < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k64 = (k0 + ks).to(tl.int64)
        k_ok = k64 < K
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + k64[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        mt = tl.load(m_ptr + k64[:, None] * stride_mk + cols64[None, :] * stride_mn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            mt = mt.to(tl.float32)
        acc = tl.dot(xt, mt, acc, input_precision=DOT_PRECISION)

    # Epilogue: + s * E(inner @ L2); inner is already in the input dtype, as the unfused product rounds it.
    inner = tl.load(inner_ptr + rows64[:, None] * stride_im + rs[None, :] * stride_ir,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    l2 = tl.load(l2_ptr + rs[:, None] * stride_l2r + cols64[None, :] * stride_l2n,
                 mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        inner = inner.to(tl.float32)
        l2 = l2.to(tl.float32)
    lora = tl.dot(inner, l2, input_precision=DOT_PRECISION)
    if DROP_OUT:
        seed = tl.load(seed_ptr)
        keep = _dropout_keep(seed, rows64[:, None] * N + cols64[None, :], drop_threshold)
        lora = tl.where(keep, lora * keep_scale, 0.0)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on,
             cast_for_store(acc, out_dtype, BF16_RNE_BY_HAND), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_down_grad_kernel(
    g_ptr, x_ptr, out_ptr, seed_ptr, M, K, R, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    drop_threshold, keep_scale,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # partial[split, r, k] = sum over this split's rows m of g[m, r] * drop(x)[m, k]  (fp32)
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R).to(tl.int64)
    k_ok = ks < K
    r_ok = rs < R
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, tl.minimum(start + rows_per_split, M), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = (rows < M) & (rows < start + rows_per_split)
        rows64 = rows.to(tl.int64)
        gt = tl.load(g_ptr + rows64[None, :] * stride_gm + rs[:, None] * stride_gr,
                     mask=r_ok[:, None] & row_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        keep = _dropout_keep(seed, rows64[:, None] * K + ks[None, :], drop_threshold)
        xd = tl.where(keep, xt.to(tl.float32) * keep_scale, 0.0)
        if UPCAST:
            gt = gt.to(tl.float32)
        else:
            xd = xd.to(xt.dtype)
        acc = tl.dot(gt, xd, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + split.to(tl.int64) * stride_os + rs[:, None] * stride_or + ks[None, :] * stride_ok, acc,
             mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def _dropout_mask_kernel(out_ptr, seed_ptr, numel, drop_threshold, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    keep = _dropout_keep(seed, offs, drop_threshold)
    # via fp32: the interpreter cannot cast bool to bf16 directly
    tl.store(out_ptr + offs, tl.where(keep, 1.0, 0.0).to(out_ptr.dtype.element_ty), mask=offs < numel)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(drop_threshold, keep_scale) of kernels/dropout.py's mask for dropout_p (0 and 1.0 without dropout)."""
    threshold = _drop_threshold(dropout_p)
    return threshold, _keep_scale(threshold)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for ``dtype`` inputs: fp32 dots use TF32 exactly when torch's own fp32 matmuls
    may (``torch.backends.cuda.matmul.allow_tf32``), so the fused path rounds as the cuBLAS one it replaces;
    half-precision dots ignore it. The CPU interpreter computes every dot exactly whatever it is told."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")  # torch >= 2.9; the legacy flag sets it too
    if precision in ("tf32", "ieee"):
        return precision
    return "tf32" if matmul.allow_tf32 else "ieee"


def _config(device: torch.device, dtype: torch.dtype) -> dict:
    """Tiles of the base GEMM (_lora_matmul_kernel) and of the rank-r down product (_lora_down_kernel)."""
    if device.type != "cuda":
        # Interpreter: cost grows with programs x ops, so few big tiles.
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1,
                    DOWN_BLOCK_M=64, DOWN_BLOCK_K=64, down_warps=4, down_stages=1)
    # The GEMM holds no rank-r state through its K loop (inner comes from _lora_down_kernel), so its tiles
    # are a plain GEMM's; stages chosen from the sm_90 compile (tests/kernels/lowrank_specs.py).
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3,
                    DOWN_BLOCK_M=32, DOWN_BLOCK_K=64, down_warps=4, down_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                DOWN_BLOCK_M=32, DOWN_BLOCK_K=128, down_warps=4, down_stages=3)


def _launch(x: Tensor, mat: Tensor, mat_strides: tuple, l1: Tensor, l1_strides: tuple, l2: Tensor,
            l2_strides: tuple, bias: Optional[Tensor], rank: int, n_out: int, scaling: float, dropout_p: float,
            seed: Optional[Tensor], drop_in: bool, drop_out: bool) -> tuple[Tensor, Tensor]:
    """out = x @ mat (+ bias) + scaling * E((D(x) @ l1) @ l2) and inner = D(x) @ l1; *_strides give the
    (row, col) strides of mat as [K, n_out], l1 as [K, rank], l2 as [rank, n_out]. Two launches: inner once
    per row tile, then the GEMM with inner @ l2 in its epilogue."""
    m, k = x.shape
    out = torch.empty((m, n_out), device=x.device, dtype=x.dtype)
    inner = torch.empty((m, rank), device=x.device, dtype=x.dtype)
    cfg = _config(x.device, x.dtype)
    meta = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)
    dummy = out  # never read when the matching flag is off
    seed_arg = seed_on(seed, x) if seed is not None else dummy
    threshold, keep_scale = _dropout_args(dropout_p)
    common = dict(UPCAST=x.device.type != "cuda", DOT_PRECISION=dot_precision(x.dtype),
                  BF16_RNE_BY_HAND=bf16_by_hand(x), BLOCK_R=_block_r(rank))
    with device_ctx(x):
        _lora_down_kernel[(triton.cdiv(m, cfg["DOWN_BLOCK_M"]),)](
            x, l1, inner, seed_arg, m, k, rank, x.stride(0), x.stride(1), *l1_strides, inner.stride(0),
            inner.stride(1), threshold, keep_scale, DROP_IN=drop_in, BLOCK_M=cfg["DOWN_BLOCK_M"],
            BLOCK_K=cfg["DOWN_BLOCK_K"], num_warps=cfg["down_warps"], num_stages=cfg["down_stages"], **common,
        )
        _lora_matmul_kernel[grid](
            x, mat, inner, l2, bias if bias is not None else dummy, out, seed_arg,
            m, n_out, k, rank,
            x.stride(0), x.stride(1), *mat_strides, inner.stride(0), inner.stride(1), *l2_strides,
            out.stride(0), out.stride(1), float(scaling), threshold, keep_scale,
            HAS_BIAS=bias is not None, DROP_OUT=drop_out, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **meta, **common,
        )
    return out, inner


def _check(x: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: the Triton LoRA kernels take fp32/fp16/bf16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D [N, in], got shape {tuple(x.shape)}")


def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y [N, out], u [N, r]) for x [N, in], W [out, in], b [out]?, A [r, in], B [out, r]."""
    _check(x, "lora_linear_fwd")
    rank, out_features = lora_A.shape[0], weight.shape[0]
    drop = dropout_p > 0.0
    return _launch(
        x, weight, (weight.stride(1), weight.stride(0)),      # M = W^T  [in, out]
        lora_A, (lora_A.stride(1), lora_A.stride(0)),         # L1 = A^T [in, r]
        lora_B, (lora_B.stride(1), lora_B.stride(0)),         # L2 = B^T [r, out]
        bias, rank, out_features, scaling, dropout_p, seed if drop else None, drop, False,
    )


def _down_grad(g_scaled: Tensor, x: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """g^T @ drop(x) with the forward's mask re-drawn: [r, in]."""
    m, k = x.shape
    rank = g_scaled.shape[1]
    if x.device.type == "cuda":
        block_m, block_k, num_warps = 64, 128, 8
        splits = max(1, min(32, triton.cdiv(m, 512)))
    else:
        block_m, block_k, num_warps = 64, 64, 4
        splits = 1
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty((splits, rank, k), device=x.device, dtype=torch.float32)
    seed = seed_on(seed, x)
    with device_ctx(x):
        _lora_down_grad_kernel[(triton.cdiv(k, block_k), splits)](
            g_scaled, x, partial, seed, m, k, rank, rows_per_split,
            g_scaled.stride(0), g_scaled.stride(1), x.stride(0), x.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2), *_dropout_args(dropout_p),
            UPCAST=x.device.type != "cuda", DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(rank), num_warps=num_warps,
        )
    return partial.sum(0)


def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                    seed: Optional[Tensor], scaling: float, dropout_p: float, need_dx: bool, need_dweight: bool,
                    need_dbias: bool, need_dA: bool, need_dB: bool):
    """(dx, dW, db, dA, dB); an empty tensor for each one not asked for."""
    _check(x, "lora_linear_bwd")
    dy = grad_y.contiguous()
    drop = dropout_p > 0.0
    rank, in_features = lora_A.shape
    dx = dweight = dbias = dA = dB = None
    g = None
    if need_dx:
        dx, g = _launch(
            dy, weight, (weight.stride(0), weight.stride(1)),  # M = W  [out, in]
            lora_B, (lora_B.stride(0), lora_B.stride(1)),      # L1 = B [out, r]
            lora_A, (lora_A.stride(0), lora_A.stride(1)),      # L2 = A [r, in]
            None, rank, in_features, scaling, dropout_p, seed if drop else None, False, drop,
        )
    if need_dA:
        if g is None:
            g = dy @ lora_B
        g_scaled = g * scaling
        dA = _down_grad(g_scaled, x, dropout_p, seed).to(x.dtype) if drop else g_scaled.t() @ x
    if need_dB:
        dB = (dy.t() @ u).mul_(scaling)
    if need_dweight:
        dweight = dy.t() @ x
    if need_dbias:
        dbias = dy.sum(0)
    return tuple(t if t is not None else x.new_empty((0,)) for t in (dx, dweight, dbias, dA, dB))


def lora_dropout_mask(like: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """The 0/1 keep-mask the kernels draw for ``seed`` over a contiguous tensor shaped like ``like``."""
    out = torch.empty(like.shape, device=like.device, dtype=like.dtype)
    numel = out.numel()
    block = 1024
    seed = seed_on(seed, like)
    with device_ctx(like):
        _dropout_mask_kernel[(triton.cdiv(numel, block),)](out, seed, numel, _drop_threshold(dropout_p), BLOCK=block)
    return out
