"""Triton RMSNorm (the "triton" backend of fastft.ops.rms_norm).

Per row x of width H, with r = rsqrt(mean(x^2) + eps) and the scale s = offset + w:

    forward   y = round_x(x r) s                  casting mode "llama" (round_x: to x's dtype, Hugging Face Llama)
              y = x r s                           casting mode "gemma" (everything in fp32)
    backward  g = dy s
              dx = r g - (r^3 / H) (g . x) x      (d/dx of x r: the row's own statistic feeds back through r)
              dw = sum over rows of dy round_x(x r)   (llama; x r for gemma)

Forward saves only the per-row r (fp32). Backward recomputes x r from x and r; each program walks a contiguous
range of rows and writes one fp32 partial of dw, which the launcher sums (one small [programs, H] reduction,
no atomics, deterministic).

Launchers (what fastft.ops.rms_norm calls for backend "triton"):
  rms_norm_fwd(x [N, H], weight [H], eps, offset, gemma, out_dtype) -> (y [N, H] out_dtype, rstd [N] fp32)
  rms_norm_bwd(grad_y, x, weight, rstd, offset, gemma, need_input, need_weight)
      -> (dx [N, H] or an empty tensor, dw [H] in weight's dtype or an empty tensor)
Values are loaded, cast to fp32, computed on and cast on store (bf16 arithmetic is also wrong in the
interpreter). Row offsets are int64 (N * H passes 2**31 at long contexts).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from ._common import bf16_by_hand, cast_for_store, device_ctx, sm_count


__all__ = ["rms_norm_fwd", "rms_norm_bwd"]


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, x_row_stride, y_row_stride, eps, offset,
    GEMMA: tl.constexpr, RNE_X: tl.constexpr, RNE_Y: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # ALIGN (elements; the launcher's _align): width and row strides are multiples of it. Rebuilding them as
    # (v // ALIGN) * ALIGN lets the compiler prove it whatever the JIT specialised, so rows load as 16-byte vectors.
    n_cols = n_cols // ALIGN * ALIGN
    x_row_stride = x_row_stride // ALIGN * ALIGN
    y_row_stride = y_row_stride // ALIGN * ALIGN
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    if not GEMMA:  # Llama: the normalised x is rounded to x's dtype before the weight multiplies it
        normed = cast_for_store(normed, x_ptr.dtype.element_ty, RNE_X).to(tl.float32)
    y = normed * scale[None, :]
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], cast_for_store(y, y_ptr.dtype.element_ty, RNE_Y),
             mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols, rows_per_program,
    dy_row_stride, x_row_stride, dx_row_stride, offset,
    GEMMA: tl.constexpr, RNE_X: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n_cols = n_cols // ALIGN * ALIGN  # see the forward kernel
    dy_row_stride = dy_row_stride // ALIGN * ALIGN
    x_row_stride = x_row_stride // ALIGN * ALIGN
    dx_row_stride = dx_row_stride // ALIGN * ALIGN
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < n_cols
    scale = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if HAS_DW:
            normed = x * rstd[:, None]
            if not GEMMA:
                normed = cast_for_store(normed, x_ptr.dtype.element_ty, RNE_X).to(tl.float32)
            dw += tl.sum(dy * normed, axis=0)
        if HAS_DX:
            g = dy * scale[None, :]
            coef = rstd * rstd * rstd * tl.sum(g * x, axis=1) / n_cols
            dx = rstd[:, None] * g - coef[:, None] * x
            tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :],
                     cast_for_store(dx, dx_ptr.dtype.element_ty, RNE_X), mask=mask)
    if HAS_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _blocks(n_cols: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps). The whole row is one tile. On CUDA small rows are batched so a program
    holds ~4k elements; under the interpreter the cost is per program and per op, so tiles are large."""
    block_h = triton.next_power_of_2(n_cols)
    budget = 4096 if device.type == "cuda" else 32768
    block_m = max(1, min(64, budget // block_h))
    tile = block_m * block_h  # warps as Liger-Kernel's calculate_settings picks them for a tile this size
    num_warps = 32 if tile >= 32768 else 16 if tile >= 8192 else 8 if tile >= 2048 else 4
    return block_m, block_h, num_warps


def _align(n_cols: int, *tensors: Tensor) -> int:
    """The largest ALIGN in {16 bytes, 1 element} (in elements) dividing the width, every row stride and every
    base address: 8 for a bf16 row of a multiple of 8, else 1 (scalar loads, e.g. an odd width)."""
    vector = 16 // tensors[0].element_size()
    ok = n_cols % vector == 0 and all(t.stride(0) % vector == 0 and t.data_ptr() % 16 == 0 for t in tensors)
    return vector if ok else 1


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, offset: float, gemma: bool,
                 out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """y [N, H] (out_dtype) and the per-row rstd [N] (fp32) of a [N, H] x with unit column stride."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block_m, block_h, num_warps = _blocks(n_cols, x.device)
    with device_ctx(x):
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x, weight, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), float(eps), float(offset),
            GEMMA=gemma, RNE_X=bf16_by_hand(x), RNE_Y=bf16_by_hand(y), ALIGN=_align(n_cols, x, y),
            BLOCK_M=block_m, BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return y, rstd


def rms_norm_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float, gemma: bool,
                 need_input: bool, need_weight: bool) -> Tuple[Tensor, Tensor]:
    """(dx in x's dtype, dw in weight's dtype); each is an empty (0,) tensor when not needed."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_input else _empty(x)
    if n_rows == 0 or not (need_input or need_weight):
        dw = torch.zeros_like(weight) if need_weight else _empty(weight)
        return dx, dw
    block_m, block_h, num_warps = _blocks(n_cols, x.device)
    # Enough programs to fill the GPU (a few per SM); each owns a contiguous range of rows and one dw partial.
    max_programs = 4 * sm_count(x.device) if x.device.type == "cuda" else 4
    rows_per_program = max(block_m, triton.cdiv(triton.cdiv(n_rows, max_programs), block_m) * block_m)
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if need_weight else _empty(rstd)
    with device_ctx(x):
        _rms_norm_bwd_kernel[(programs,)](
            grad_y, x, weight, rstd, dx if need_input else x, dw_partial if need_weight else rstd,
            n_rows, n_cols, rows_per_program, grad_y.stride(0), x.stride(0), n_cols, float(offset),
            GEMMA=gemma, RNE_X=bf16_by_hand(x), HAS_DX=need_input, HAS_DW=need_weight,
            ALIGN=_align(n_cols, grad_y, x, *((dx,) if need_input else ())), BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
        )
    dw = dw_partial.sum(0).to(weight.dtype) if need_weight else _empty(weight)
    return dx, dw
