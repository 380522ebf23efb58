"""Triton cross-entropy: loss, logsumexp and (optionally) the gradient in one kernel per row.

Per counted row (target y != ignore_index), with logits x softcapped first when softcap = s > 0
(x <- s * tanh(x / s)), class weights w (all ones when absent), W = sum_c w_c, eps = label smoothing,
lse = logsumexp(x) and p = softmax(x):

    loss    = (1-eps) w_y (lse - x_y) + (eps/V) (W lse - sum_c w_c x_c) + z_loss lse^2
    dloss/dx_j = p_j ((1-eps) w_y + (eps/V) W + 2 z_loss lse) - (eps/V) w_j - [j == y] (1-eps) w_y
                 (times 1 - tanh(x_j / s)^2 with a softcap: the chain rule through the cap)

Ignored rows give loss 0 and a zero gradient row and are not read (their lse is stored as 0). A target outside
[0, V) that is not ignore_index is never used as an address: its loss and gradient row are NaN.
The math is fastft.reference.cross_entropy; the contract is the docstring of fastft.ops.cross_entropy.

Launchers (what fastft.ops.cross_entropy calls for backend "triton"):
  cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap)
      -> (loss[N] f32, lse[N] f32, grad[N, V] in logits' dtype, or an empty (0,) tensor when grad_scale is None)
  cross_entropy_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap)
      -> grad[N, V]
  scale_if_not_one_(grad, scale): grad *= scale in place, a no-op on the device when scale == 1.

Every value is loaded, cast to fp32, computed on and cast back on store (bf16 arithmetic is also
wrong in the Triton interpreter). One program handles one row; row offsets are int64 because
N * V passes 2**31 at LLM sizes (8192 x 128256).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from ._common import (bf16_by_hand, cast_for_store, device_ctx, gradient_buffer, rest_offsets, row_alignment,
                      row_config, row_split, sm_count, tanh, write_row_map)

__all__ = ["cross_entropy_fwd", "cross_entropy_bwd", "scale_if_not_one_"]


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _grad_block(x, offs, mask, args, FLAGS: tl.constexpr):
    """Gradient of one block of raw fp32 logits x (columns offs) given the row's lse:
    p_j * a - c_smooth * w_j - [j == y] * c_hit, times the softcap derivative (write_row_map's block_fn)."""
    y, lse, a, c_smooth, c_hit, weight_ptr, softcap = args
    HAS_WEIGHT: tl.constexpr = FLAGS[0]
    HAS_SMOOTHING: tl.constexpr = FLAGS[1]
    HAS_SOFTCAP: tl.constexpr = FLAGS[2]
    if HAS_SOFTCAP:
        t = tanh(x / softcap)
        x = softcap * t
    g = tl.exp(x - lse) * a
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
            g = g - c_smooth * w
        else:
            g = g - c_smooth
    g = tl.where(offs == y, g - c_hit, g)
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    return g


@triton.jit
def _online_block(x, offs, mask, m, s, sum_wx, sum_w, weight_ptr, softcap,
                  HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One block of raw fp32 logits x (columns offs, lanes mask) into the online softmax (m, s) and,
    with label smoothing, into sum_c w_c x_c and sum_c w_c."""
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    if HAS_SMOOTHING:  # masked lanes hold x = 0 (softcap(0) = 0) and w = 0
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
            sum_wx += tl.sum(w * x, axis=0)
            sum_w += tl.sum(w, axis=0)
        else:
            sum_wx += tl.sum(x, axis=0)
    x = tl.where(mask, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While every logit so far is -inf (a masked vocabulary range, a padded tail) m_new is -inf and
    # exp(x - m_new) would be exp(-inf + inf) = NaN: shift by 0 instead, which gives exp(-inf) = 0.
    # +inf and NaN logits still make s NaN (inf - inf, NaN - m), so they are never hidden.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
    return m_new, s, sum_wx, sum_w


@triton.jit
def _target_terms(weight_ptr, safe_y, V, label_smoothing, sum_w, HAS_WEIGHT: tl.constexpr,
                  HAS_SMOOTHING: tl.constexpr):
    """Per-row constants of the loss and its gradient: hit = (1-eps) w_y, eps_v = eps / V and
    W = sum_c w_c (sum_w with class weights, V without). eps_v and W are 0 without smoothing."""
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + safe_y)
    else:
        w_y = 1.0
    if HAS_SMOOTHING:
        hit = (1.0 - label_smoothing) * w_y
        eps_v = label_smoothing / tl.cast(V, tl.float32)
        if HAS_WEIGHT:
            W = sum_w
        else:
            W = tl.cast(V, tl.float32)
    else:
        hit = w_y
        eps_v = 0.0
        W = 0.0
    return hit, eps_v, W


@triton.jit
def _write_grad_row(
    logits_ptr, x_start, grad_ptr, g_start, V, counted, in_range, y, lse, upstream, hit, eps_v, W, z_loss,
    weight_ptr, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BF16_RNE_BY_HAND: tl.constexpr, VEC: tl.constexpr, GRAD_ALIGNED_LIKE_LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """upstream * dloss/dlogits over one row, swept in blocks (forward's fused gradient, with the
    reduction scale as upstream, and backward, with the row's upstream gradient, share it). hit is
    (1-eps) w_y; an out-of-range target gives a NaN row. Ignored rows load nothing and store zeros."""
    a = hit
    c_smooth = 0.0
    if HAS_SMOOTHING:
        a += eps_v * W
        c_smooth = upstream * eps_v
    if HAS_Z_LOSS:
        a += 2.0 * z_loss * lse
    a = tl.where(in_range, a, float("nan")) * upstream
    c_hit = upstream * hit
    write_row_map(logits_ptr, x_start, grad_ptr, g_start, V, counted, _grad_block,
                  (y, lse, a, c_smooth, c_hit, weight_ptr, softcap), (HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP),
                  BF16_RNE_BY_HAND, VEC, GRAD_ALIGNED_LIKE_LOGITS, BLOCK)


# ------------------------------------------------------------------------------------------------
# Forward: loss, lse and, with RETURN_GRAD, grad_scale * dloss/dlogits
# ------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr, stride_row, target_ptr, weight_ptr, grad_scale_ptr,
    loss_ptr, lse_ptr, grad_ptr,
    V, ignore_index, label_smoothing, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, RETURN_GRAD: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr, VEC: tl.constexpr,
    GRAD_ALIGNED_LIKE_LOGITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_start = row * stride_row  # int64: N * V passes 2**31 at LLM sizes
    x_row = logits_ptr + x_start
    y = tl.load(target_ptr + row)
    counted = y != ignore_index
    in_range = (y >= 0) & (y < V)
    cols = tl.arange(0, BLOCK)

    # One pass over the row with the online softmax (Milakov & Gimelshein 2018, "Online normalizer
    # calculation for softmax"): keep the running max m and s = sum_j exp(x_j - m). A block with
    # max b moves the max to m' = max(m, b) and rescales: s' = s * exp(m - m') + sum_block exp(x - m').
    # At the end lse = m + log(s). sum_c w_c x_c (label smoothing) accumulates in the same pass.
    m = float("-inf")
    s = 0.0
    sum_wx = 0.0
    sum_w = 0.0
    # The row in row_split's order: aligned whole blocks first (16-byte loads), then the masked rest;
    # every update below is order-independent.
    head, body_end, rest = row_split(x_start, V, VEC, BLOCK)
    full = cols < BLOCK
    for start in range(head, body_end, BLOCK):
        # Ignored rows (padding, prompt tokens) are never read: their loss and gradient are 0 and
        # their lse is unused, so the masked load moves no bytes.
        x = tl.load(logits_ptr + tl.multiple_of(x_start + start, VEC) + cols, mask=full & counted, other=0.0)
        m, s, sum_wx, sum_w = _online_block(x.to(tl.float32), start + cols, full, m, s, sum_wx, sum_w, weight_ptr,
                                            softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
    for start in range(0, rest, BLOCK):
        offs, mask = rest_offsets(start, cols, head, body_end, rest)
        x = tl.load(x_row + offs, mask=mask & counted, other=0.0)
        m, s, sum_wx, sum_w = _online_block(x.to(tl.float32), offs, mask, m, s, sum_wx, sum_w, weight_ptr,
                                            softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
    lse = m + tl.log(s)

    # The target's logit and weight: one scalar load each, at column 0 when y is out of range.
    safe_y = tl.where(in_range, y, 0)
    x_y = tl.load(x_row + safe_y).to(tl.float32)
    if HAS_SOFTCAP:
        x_y = softcap * tanh(x_y / softcap)
    hit, eps_v, W = _target_terms(weight_ptr, safe_y, V, label_smoothing, sum_w, HAS_WEIGHT, HAS_SMOOTHING)

    loss = hit * (lse - x_y)
    if HAS_SMOOTHING:
        loss += eps_v * (W * lse - sum_wx)
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(counted, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, tl.where(counted, lse, 0.0))

    if RETURN_GRAD:
        # Second sweep over the same row (on a GPU it is usually still in L2).
        _write_grad_row(logits_ptr, x_start, grad_ptr, row * V, V, counted, in_range, y, lse,
                        tl.load(grad_scale_ptr), hit, eps_v, W, z_loss, weight_ptr, softcap, HAS_WEIGHT,
                        HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP, BF16_RNE_BY_HAND, VEC, GRAD_ALIGNED_LIKE_LOGITS,
                        BLOCK)


# ------------------------------------------------------------------------------------------------
# Backward from a saved lse (reduction "none": a per-row upstream gradient)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_bwd_kernel(
    grad_loss_ptr, logits_ptr, stride_row, target_ptr, weight_ptr, weight_sum_ptr, lse_ptr, grad_ptr,
    V, ignore_index, label_smoothing, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr, VEC: tl.constexpr,
    GRAD_ALIGNED_LIKE_LOGITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(target_ptr + row)
    counted = y != ignore_index
    in_range = (y >= 0) & (y < V)
    safe_y = tl.where(in_range, y, 0)
    go = tl.load(grad_loss_ptr + row)
    lse = tl.load(lse_ptr + row)
    if HAS_WEIGHT and HAS_SMOOTHING:
        sum_w = tl.load(weight_sum_ptr)
    else:
        sum_w = 0.0
    hit, eps_v, W = _target_terms(weight_ptr, safe_y, V, label_smoothing, sum_w, HAS_WEIGHT, HAS_SMOOTHING)
    _write_grad_row(logits_ptr, row * stride_row, grad_ptr, row * V, V, counted, in_range, y, lse, go, hit, eps_v, W,
                    z_loss, weight_ptr, softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP, BF16_RNE_BY_HAND,
                    VEC, GRAD_ALIGNED_LIKE_LOGITS, BLOCK)


# ------------------------------------------------------------------------------------------------
# In-place scale that costs one scalar load when the scale is 1
# ------------------------------------------------------------------------------------------------


@triton.jit
def _scale_if_not_one_kernel(grad_ptr, scale_ptr, numel, num_blocks, BF16_RNE_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    # Persistent grid-stride loop: the launch is a few programs per SM whatever the size, so the
    # common scale == 1 case (plain loss.backward()) is one tiny launch and no memory traffic.
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        pid = tl.program_id(0)
        num_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        for blk in range(pid, num_blocks, num_programs):
            offs = tl.cast(blk, tl.int64) * BLOCK + cols  # int64: numel may pass 2**31
            mask = offs < numel
            g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_ptr + offs, cast_for_store(g * scale, grad_ptr.dtype.element_ty, BF16_RNE_BY_HAND), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, target: Tensor, name: str) -> Tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    n, v = logits.shape
    if v == 0:
        raise ValueError(f"{name}: logits have 0 classes")
    if n > 0 and logits.stride(1) != 1:
        raise ValueError(f"{name}: logits must have a unit stride on the class dimension, got {logits.stride()}")
    if target.shape != (n,):
        raise ValueError(f"{name}: target must have shape ({n},), got {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"{name}: target must be int64, got {target.dtype}")
    return n, v


# 4096 columns x 16 warps on CUDA: 40 registers at sm_90 with the gradient (8192 x 16 took 81 once the body
# loads became 16-byte, 4096 took 55 until row_split's bounds became int32), so 3 CTAs (48 warps) per SM;
# measured with an ahead-of-time sm_90 compile (benchmarks/gpu_static).
_CUDA_BLOCK = 4096


def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    grad_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    *,
    out: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row loss and lse (fp32, [N]) and, when ``grad_scale`` (a 0-dim fp32 tensor) is given,
    ``grad_scale * dloss_i/dlogits`` as a contiguous [N, V] tensor in logits' dtype (else an empty
    (0,) tensor and no gradient work). ``softcap`` 0.0 means no cap.

    ``out`` receives the gradient instead of a new tensor; it may be ``logits`` itself (contiguous):
    each row's program finishes its first sweep and the target logit before its second sweep reads
    a block and then stores that block's gradient, so the fused linear cross-entropy needs one
    [chunk x vocab] buffer instead of two."""
    n, v = _check_logits(logits, target, "cross_entropy_fwd")
    device = logits.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty(n, dtype=torch.float32, device=device)
    return_grad = grad_scale is not None
    if out is not None and not return_grad:
        raise ValueError("cross_entropy_fwd: out= is the gradient's buffer; it needs grad_scale")
    if return_grad:
        grad = gradient_buffer(logits, out, "cross_entropy_fwd")
    else:
        grad = torch.empty((0,), dtype=logits.dtype, device=device)
    if n == 0:
        return loss, lse, grad
    target = target.contiguous()
    has_weight = weight is not None
    w = weight.to(torch.float32).contiguous() if has_weight else loss  # placeholder, never read
    scale = grad_scale.reshape(()).to(torch.float32) if return_grad else loss  # placeholder, never read
    block, num_warps = row_config(v, device, cuda_max_block=_CUDA_BLOCK)
    with device_ctx(logits):
        _cross_entropy_fwd_kernel[(n,)](
            logits, logits.stride(0), target, w, scale,
            loss, lse, grad if return_grad else loss,
            v, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
            HAS_WEIGHT=has_weight,
            HAS_SMOOTHING=float(label_smoothing) > 0.0,
            HAS_Z_LOSS=float(z_loss) > 0.0,
            HAS_SOFTCAP=float(softcap) > 0.0,
            RETURN_GRAD=return_grad,
            BF16_RNE_BY_HAND=bf16_by_hand(logits),
            **row_alignment(logits),
            BLOCK=block,
            num_warps=num_warps,
        )
    return loss, lse, grad


def cross_entropy_bwd(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``grad_loss[i] * dloss_i/dlogits_i`` as a contiguous [N, V] tensor in logits' dtype, from the
    ``lse`` saved by :func:`cross_entropy_fwd`; ignored rows are zero. ``out`` receives it instead of a
    new tensor and may be ``logits`` itself (each block is read before its gradient is stored)."""
    n, v = _check_logits(logits, target, "cross_entropy_bwd")
    device = logits.device
    grad = gradient_buffer(logits, out, "cross_entropy_bwd")
    if n == 0:
        return grad
    if grad_loss.numel() != n or lse.numel() != n:
        raise ValueError(
            f"cross_entropy_bwd: grad_loss and lse must hold {n} values, got {grad_loss.numel()} and {lse.numel()}"
        )
    target = target.contiguous()
    grad_loss = grad_loss.reshape(n).to(torch.float32).contiguous()
    lse = lse.reshape(n).to(torch.float32).contiguous()
    has_weight = weight is not None
    has_smoothing = float(label_smoothing) > 0.0
    w = weight.to(torch.float32).contiguous() if has_weight else lse  # placeholder, never read
    # W = sum(w) is needed only with weights and smoothing: one tiny reduction, no host sync.
    w_sum = w.sum().reshape(()) if has_weight and has_smoothing else lse
    block, num_warps = row_config(v, device, cuda_max_block=_CUDA_BLOCK)
    with device_ctx(logits):
        _cross_entropy_bwd_kernel[(n,)](
            grad_loss, logits, logits.stride(0), target, w, w_sum, lse, grad,
            v, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
            HAS_WEIGHT=has_weight,
            HAS_SMOOTHING=has_smoothing,
            HAS_Z_LOSS=float(z_loss) > 0.0,
            HAS_SOFTCAP=float(softcap) > 0.0,
            BF16_RNE_BY_HAND=bf16_by_hand(logits),
            **row_alignment(logits),
            BLOCK=block,
            num_warps=num_warps,
        )
    return grad


_SCALE_BLOCK = 4096


def scale_if_not_one_(grad: Tensor, scale: Tensor) -> None:
    """``grad *= scale`` in place, ``scale`` a 0-dim fp32 tensor on grad's device. The kernel reads
    the scalar on the device and returns at once when it is 1.0: no host sync, no memory traffic."""
    numel = grad.numel()
    if numel == 0:
        return
    scale = scale.reshape(()).to(torch.float32)
    if not grad.is_contiguous():
        grad.mul_(scale)  # not reached from fastft.ops (its gradient buffers are contiguous)
        return
    num_blocks = triton.cdiv(numel, _SCALE_BLOCK)
    if grad.device.type == "cuda":
        programs = min(num_blocks, 4 * sm_count(grad.device))
    else:
        programs = min(num_blocks, 2)
    with device_ctx(grad):
        _scale_if_not_one_kernel[(programs,)](
            grad, scale, numel, num_blocks, BF16_RNE_BY_HAND=bf16_by_hand(grad), BLOCK=_SCALE_BLOCK, num_warps=8
        )
