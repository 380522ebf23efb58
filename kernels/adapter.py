"""Triton epilogues of the bottleneck adapter (the "triton" backend of fastft.ops.adapter).

The adapter is y = x + scale * (h W_up^T + b_up) with h = dropout(act(pre)), pre = x W_down^T + b_down.
The GEMMs run in cuBLAS (fastft/ops/adapter.py, shared by every backend); these kernels are the
element-wise steps on the [N, r] bottleneck between them, one pass each:

  adapter_act_dropout_fwd(pre, seed, activation, drop_threshold, append_ones) -> h [N, padded_width(r, append_ones)]
      h = act(pre) * keep * keep_scale; with append_ones column r is ones, so one GEMM against
      [W_up | b_up] adds the bias (and, through addmm, the residual). The row is padded with zero columns to a
      multiple of 8 elements (16 bytes in bf16): an r + 1 = 65-wide row (130 bytes) rules out aligned vector
      loads and TMA in the GEMM; the zero columns meet zero columns of the padded [W_up | b_up] (the same values,
      and their gradient columns are dropped, so they are never trained).
  adapter_act_dropout_bwd(grad_h, pre, seed, activation, drop_threshold, grad_scale, append_ones, return_h)
      -> (grad_pre [N, r], h [N, padded_width(r, append_ones)] or an empty tensor)
      grad_pre = grad_scale * grad_h * act'(pre) * keep * keep_scale; h recomputed for dW_up.

Dropout: element (i, j) has the flat index i * r + j; its keep bit is kernels/dropout.py's counter-based
hash (the same function as csrc/_dropout.h and fastft/reference/dropout.py), so all backends drop the same
elements and backward regenerates the mask from the seed. The seed is a 0-dim int64 tensor read on the device
(no host sync). Values are loaded, cast to fp32, computed on and cast back on store.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dropout import keep as _dropout_keep, keep_scale as _keep_scale, seed_on
from ._common import bf16_by_hand, cast_for_store, device_ctx, tanh

__all__ = ["adapter_act_dropout_fwd", "adapter_act_dropout_bwd", "padded_width"]

_RELU, _GELU, _GELU_TANH, _SILU = 0, 1, 2, 3


@triton.jit
def _activation(p, ACTIVATION: tl.constexpr, RETURN_GRAD: tl.constexpr):
    """(act(p), act'(p)) in fp32; the derivative is 0.0 when RETURN_GRAD is off."""
    d = 0.0
    if ACTIVATION == 0:  # relu; NaN stays NaN as in torch.relu
        a = tl.where(p > 0.0, p, tl.where(p != p, p, 0.0))
        if RETURN_GRAD:
            d = tl.where(p > 0.0, 1.0, 0.0)
    elif ACTIVATION == 1:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476))
        a = p * cdf
        if RETURN_GRAD:
            d = cdf + p * 0.3989422804014327 * tl.exp(-0.5 * p * p)
    elif ACTIVATION == 2:  # gelu, tanh approximation
        p2 = p * p
        t = tanh(0.7978845608028654 * p * (1.0 + 0.044715 * p2))
        a = 0.5 * p * (1.0 + t)
        if RETURN_GRAD:
            d = 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * p2)
    else:  # silu
        s = tl.sigmoid(p)
        a = p * s
        if RETURN_GRAD:
            d = s * (1.0 + p * (1.0 - s))
    return a, d


@triton.jit
def _adapter_act_dropout_kernel(
    pre_ptr, grad_h_ptr, seed_ptr, h_ptr, grad_pre_ptr,
    N, R, h_stride, threshold, keep_scale, grad_scale,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, APPEND_ONES: tl.constexpr,
    BACKWARD: tl.constexpr, RETURN_H: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, PAD_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < N
    for c0 in range(0, R, BLOCK_R):
        c = c0 + cols
        mask = row_ok[:, None] & (c < R)[None, :]
        index = rows[:, None] * R + c[None, :]
        p = tl.load(pre_ptr + index, mask=mask, other=0.0).to(tl.float32)
        a, d = _activation(p, ACTIVATION, BACKWARD)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            k = tl.where(_dropout_keep(seed, index, threshold), keep_scale, 0.0)
            a = a * k
        if BACKWARD:
            g = tl.load(grad_h_ptr + index, mask=mask, other=0.0).to(tl.float32)
            g = grad_scale * g * d
            if HAS_DROPOUT:
                g = g * k
            tl.store(grad_pre_ptr + index, cast_for_store(g, grad_pre_ptr.dtype.element_ty, BF16_RNE_BY_HAND),
                     mask=mask)
        if RETURN_H:
            h_off = rows[:, None] * h_stride + c[None, :]
            tl.store(h_ptr + h_off, cast_for_store(a, h_ptr.dtype.element_ty, BF16_RNE_BY_HAND), mask=mask)
    if RETURN_H:
        # Columns R .. h_stride - 1: the ones column (APPEND_ONES) and the zero padding (fewer than 8 + 1).
        pad = R + tl.arange(0, PAD_BLOCK).to(tl.int64)
        fill = tl.where((pad == R) & APPEND_ONES, 1.0, 0.0)
        tl.store(h_ptr + rows[:, None] * h_stride + pad[None, :],
                 tl.broadcast_to(fill[None, :], (BLOCK_M, PAD_BLOCK)).to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (pad < h_stride)[None, :])


def padded_width(r: int, append_ones: bool) -> int:
    """The row width of h: r (+1 for the ones column) rounded up to a multiple of 8 elements."""
    return (r + int(append_ones) + 7) // 8 * 8


def _config(n: int, r: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_R, num_warps): the whole bottleneck row in one tile up to r = 256 (r = 64 is usual);
    ~1k elements per program on CUDA (8 per thread: sm_90, r = 64, gelu + dropout compiles to 78 / 93
    registers forward / backward, 5+ CTAs per SM; 4k elements took 252 / 255), ~16k under the interpreter
    (cost per program there)."""
    block_r = min(triton.next_power_of_2(max(r, 1)), 256)
    per_program = 1024 if device.type == "cuda" else 16384
    block_m = max(1, min(per_program // block_r, triton.next_power_of_2(max(n, 1))))
    return block_m, block_r, 4


def _check(pre: Tensor, name: str) -> Tuple[int, int]:
    if pre.dim() != 2 or not pre.is_contiguous():
        raise ValueError(f"{name}: pre must be a contiguous [N, r] tensor, got shape {tuple(pre.shape)}")
    if pre.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: pre must be float32, float16 or bfloat16, got {pre.dtype}")
    return pre.shape


def _launch(pre, grad_h, seed, h, grad_pre, activation, drop_threshold, grad_scale, append_ones, backward, return_h):
    n, r = pre.shape
    if n == 0:
        return
    has_dropout = drop_threshold > 0
    keep_scale = _keep_scale(drop_threshold) if has_dropout else 1.0
    block_m, block_r, num_warps = _config(n, r, pre.device)
    if has_dropout:
        seed = seed_on(seed, pre)
    with device_ctx(pre):
        _adapter_act_dropout_kernel[(triton.cdiv(n, block_m),)](
            pre, grad_h if backward else pre, seed if has_dropout else pre, h if return_h else pre,
            grad_pre if backward else pre,
            n, r, h.stride(0) if return_h else 0, int(drop_threshold), keep_scale, float(grad_scale),
            ACTIVATION=int(activation), HAS_DROPOUT=has_dropout, APPEND_ONES=bool(append_ones),
            BACKWARD=backward, RETURN_H=return_h, BF16_RNE_BY_HAND=bf16_by_hand(pre),
            BLOCK_M=block_m, BLOCK_R=block_r, PAD_BLOCK=8, num_warps=num_warps,
        )


def adapter_act_dropout_fwd(pre: Tensor, seed: Tensor, activation: int, drop_threshold: int, append_ones: bool) -> Tensor:
    n, r = _check(pre, "adapter_act_dropout_fwd")
    h = torch.empty((n, padded_width(r, append_ones)), dtype=pre.dtype, device=pre.device)
    _launch(pre, None, seed, h, None, activation, drop_threshold, 1.0, append_ones, False, True)
    return h


def adapter_act_dropout_bwd(
    grad_h: Tensor, pre: Tensor, seed: Tensor, activation: int, drop_threshold: int, grad_scale: float,
    append_ones: bool, return_h: bool,
) -> Tuple[Tensor, Tensor]:
    n, r = _check(pre, "adapter_act_dropout_bwd")
    if grad_h.shape != pre.shape or grad_h.dtype != pre.dtype:
        raise ValueError(f"adapter_act_dropout_bwd: grad_h {tuple(grad_h.shape)} {grad_h.dtype} must match pre")
    grad_h = grad_h.contiguous()
    grad_pre = torch.empty_like(pre)
    h = torch.empty((n, padded_width(r, append_ones)) if return_h else (0,), dtype=pre.dtype, device=pre.device)
    _launch(pre, grad_h, seed, h, grad_pre, activation, drop_threshold, grad_scale, append_ones, True, return_h)
    return grad_pre, h
