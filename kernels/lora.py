"""Triton LoRA linear: one fused GEMM kernel for forward and for the input gradient.

    forward:  y  = x W^T + b + s * (drop(x) A^T) B^T,        u = drop(x) A^T      (drop(x) = x * keep / (1-p))
    backward: dx = dy W + s * keep/(1-p) * ((dy B) A),        g = dy B
              dA = s g^T drop(x)   dB = s dy^T u   dW = dy^T x   db = sum_rows dy

Both big products are the same kernel, ``_lora_matmul_kernel``: out = X @ M (+ bias) + s * E((D(X) @ L1) @ L2).
Each program owns one [BLOCK_M, BLOCK_N] output tile and walks the shared dimension K once; every X
tile it loads feeds both the main product and the rank-r "inner" product D(X) @ L1 (so X is read once
for both paths; the inner product is recomputed by each column tile, r / BLOCK_N extra flops). At the end
of the K loop the tile's inner [BLOCK_M, r] is complete and the epilogue adds s * inner @ L2 in registers:
no second pass over the output, no [N, out] LoRA temporary. Column-tile 0 also stores inner (u or g,
[N, r], small), which backward needs.
  forward: X = x, M = W^T, L1 = A^T, L2 = B^T, D = dropout on X (DROP_IN)
  dx:      X = dy, M = W,  L1 = B,   L2 = A,   E = the same mask on the output (DROP_OUT)
Dropout: keep = kernels/_dropout.py's counter-based hash of (seed, m * in_features + k) (the mask every
backend draws: csrc/_dropout.h, fastft/reference/dropout.py), from a one-element int64 seed tensor; backward (DROP_OUT here, and ``_lora_down_grad_kernel`` for dA) re-draws the identical
mask from the same seed and the same element offsets, so no mask or dropped copy of x is stored.
dA with dropout is ``_lora_down_grad_kernel`` (g^T @ drop(x), split over rows, partial sums reduced in
fp32); without dropout, and dB, dW, db, are single cuBLAS calls (torch.mm).

Numerics: fp32 accumulation; bf16/fp16 tiles go to tl.dot as they are on a GPU; under the CPU
interpreter (bf16 arithmetic wrong there) they are cast to fp32 first (UPCAST). fp32 inputs use
input_precision="ieee" (no TF32), as torch's default matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dropout import drop_threshold as _drop_threshold, keep as _dropout_keep, keep_scale as _keep_scale
from ._common import bf16_by_hand, cast_for_store, device_ctx

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "lora_dropout_mask"]


@triton.jit
def _lora_matmul_kernel(
    x_ptr, m_ptr, l1_ptr, l2_ptr, bias_ptr, out_ptr, inner_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_mk, stride_mn, stride_l1k, stride_l1r, stride_l2r, stride_l2n,
    stride_om, stride_on, stride_im, stride_ir,
    scaling, drop_threshold, keep_scale,
    HAS_BIAS: tl.constexpr, DROP_IN: tl.constexpr, DROP_OUT: tl.constexpr, STORE_INNER: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
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

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N
    r_ok = rs < R
    rows64 = rows.to(tl.int64)
    in_dtype = x_ptr.dtype.element_ty
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    if DROP_IN or DROP_OUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    inner = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        mt = tl.load(m_ptr + k[:, None] * stride_mk + cols[None, :] * stride_mn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        l1 = tl.load(l1_ptr + k[:, None] * stride_l1k + rs[None, :] * stride_l1r,
                     mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            mt = mt.to(tl.float32)
            l1 = l1.to(tl.float32)
        acc = tl.dot(xt, mt, acc, input_precision=precision)
        if DROP_IN:
            keep = _dropout_keep(seed, rows64[:, None] * K + k[None, :], drop_threshold)
            xt = tl.where(keep, xt.to(tl.float32) * keep_scale, 0.0).to(xt.dtype)
        inner = tl.dot(xt, l1, inner, input_precision=precision)

    # Epilogue: + s * inner @ L2 (inner rounded to the input dtype first, as the unfused product would be).
    if UPCAST:
        inner_in = inner.to(in_dtype).to(tl.float32)
    else:
        inner_in = inner.to(in_dtype)
    l2 = tl.load(l2_ptr + rs[:, None] * stride_l2r + cols[None, :] * stride_l2n,
                 mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        l2 = l2.to(tl.float32)
    lora = tl.dot(inner_in, l2, input_precision=precision)
    if DROP_OUT:
        keep = _dropout_keep(seed, rows64[:, None] * N + cols[None, :], drop_threshold)
        lora = tl.where(keep, lora * keep_scale, 0.0)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on,
             cast_for_store(acc, out_dtype, BF16_RNE_BY_HAND), mask=row_ok[:, None] & col_ok[None, :])
    if STORE_INNER:
        if pid_n == 0:
            tl.store(inner_ptr + rows64[:, None] * stride_im + rs[None, :] * stride_ir,
                     cast_for_store(inner, out_dtype, BF16_RNE_BY_HAND), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_down_grad_kernel(
    g_ptr, x_ptr, out_ptr, seed_ptr, M, K, R, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    drop_threshold, keep_scale,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # partial[split, r, k] = sum over this split's rows m of g[m, r] * drop(x)[m, k]  (fp32)
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R)
    k_ok = ks < K
    r_ok = rs < R
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
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
        acc = tl.dot(gt, xd, acc, input_precision=precision)
    tl.store(out_ptr + split * stride_os + rs[:, None] * stride_or + ks[None, :] * stride_ok, acc,
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
    """(drop_threshold, keep_scale) of kernels/_dropout.py's mask for dropout_p (0 and 1.0 without dropout)."""
    threshold = _drop_threshold(dropout_p)
    return threshold, _keep_scale(threshold)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _config(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        # Interpreter: cost grows with programs x ops, so few big tiles.
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _launch(x: Tensor, mat: Tensor, mat_strides: tuple, l1: Tensor, l1_strides: tuple, l2: Tensor,
            l2_strides: tuple, bias: Optional[Tensor], rank: int, n_out: int, scaling: float, dropout_p: float,
            seed: Optional[Tensor], drop_in: bool, drop_out: bool) -> tuple[Tensor, Tensor]:
    """out = x @ mat (+ bias) + scaling * E((D(x) @ l1) @ l2) and inner = D(x) @ l1; *_strides give the
    (row, col) strides of mat as [K, n_out], l1 as [K, rank], l2 as [rank, n_out]."""
    m, k = x.shape
    out = torch.empty((m, n_out), device=x.device, dtype=x.dtype)
    inner = torch.empty((m, rank), device=x.device, dtype=x.dtype)
    cfg = _config(x.device, x.dtype)
    meta = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)
    dummy = out  # never read when the matching flag is off
    with device_ctx(x):
        _lora_matmul_kernel[grid](
            x, mat, l1, l2, bias if bias is not None else dummy, out, inner, seed if seed is not None else dummy,
            m, n_out, k, rank,
            x.stride(0), x.stride(1), *mat_strides, *l1_strides, *l2_strides,
            out.stride(0), out.stride(1), inner.stride(0), inner.stride(1),
            float(scaling), *_dropout_args(dropout_p),
            HAS_BIAS=bias is not None, DROP_IN=drop_in, DROP_OUT=drop_out, STORE_INNER=True,
            UPCAST=x.device.type != "cuda", IEEE=x.dtype == torch.float32, BF16_RNE_BY_HAND=bf16_by_hand(x),
            BLOCK_R=_block_r(rank), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **meta,
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
    with device_ctx(x):
        _lora_down_grad_kernel[(triton.cdiv(k, block_k), splits)](
            g_scaled, x, partial, seed, m, k, rank, rows_per_split,
            g_scaled.stride(0), g_scaled.stride(1), x.stride(0), x.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2), *_dropout_args(dropout_p),
            UPCAST=x.device.type != "cuda", IEEE=x.dtype == torch.float32,
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
    with device_ctx(like):
        _dropout_mask_kernel[(triton.cdiv(numel, block),)](out, seed, numel, _drop_threshold(dropout_p), BLOCK=block)
    return out
