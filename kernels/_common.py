"""Helpers shared by the Triton kernels of fastft.kernels: fp32 -> output-dtype stores (with the
interpreter's bf16 rounding workaround), tanh, the split of a row for 16-byte loads at any row length,
per-row launch configuration and the device context."""
import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["bf16_by_hand", "cast_for_store", "device_ctx", "gradient_buffer", "rest_offsets", "row_alignment",
           "row_config", "row_split", "sm_count", "tanh", "write_row_map"]


@triton.jit
def tanh(z):
    # Not every Triton version has tl.tanh (it lives in libdevice on some), so build it from exp:
    # tanh(|z|) = (1 - e) / (1 + e) with e = exp(-2|z|) in (0, 1]: no intermediate overflows for
    # any finite z (logits of +-1e4 included), the sign is put back at the end. For small |z| the
    # difference 1 - e cancels; there the odd Taylor series z - z^3/3 + 2 z^5/15 is exact to fp32
    # (next term 17 z^7 / 315 < 3e-9 |z| at |z| < 1/16). Max error measured: 6e-8 abs, 4e-7 rel.
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    t_small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0)))
    t = tl.where(a < 0.0625, t_small, t)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def cast_for_store(g, out_dtype: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr):
    """g (fp32) cast to the output dtype for tl.store."""
    if BF16_RNE_BY_HAND:
        # Interpreter workaround: TRITON_INTERPRET=1 (3.7.1) casts fp32 -> bf16 by truncation, even with
        # fp_downcast_rounding="rtne", so bf16 gradients came out one ulp low (3x torch's rounding error).
        # Round to nearest even on the bits, after which the truncating cast is exact. GPUs round
        # correctly and never take this branch (the launcher sets it only off CUDA).
        bits = g.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        r = tl.where(g != g, g, bits.to(tl.float32, bitcast=True))  # keep NaN a NaN
        return r.to(tl.bfloat16)
    else:
        return g.to(out_dtype)


@triton.jit
def row_split(row_start, V, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """A row of V elements starting at element row_start (of a 16-byte aligned tensor), split for 16-byte
    loads at any V (e.g. 32001, whose rows start at every alignment): head = elements before the first
    16-byte boundary (< VEC), then whole BLOCKs from there (aligned, unmasked: the compiler emits
    ld.global.v4 for them), then the rest = the tail after them plus the head, swept masked.
    Sweep the body with ``tl.multiple_of(row_start + start, VEC)`` for start in range(head, body_end, BLOCK)
    (true for any base: row_start + head is a multiple of VEC) and the rest with rest_offsets.
    The three bounds are int32 (V < 2**31) although row_start is int64: int64 bounds made every column offset
    int64, two registers each (sm_90: the CE forward with its gradient 55 -> 40 registers, 2 -> 3 CTA/SM)."""
    head = tl.minimum((VEC - row_start % VEC) % VEC, V).to(tl.int32)
    body_end = head + ((V - head) // BLOCK) * BLOCK
    return head, body_end, head + (V - body_end)


@triton.jit
def rest_offsets(start, cols, head, body_end, rest):
    """Column offsets and mask of one block of row_split's masked rest (start in range(0, rest, BLOCK)):
    the first `head` lanes of the rest are columns [0, head), the others columns [body_end, V)."""
    idx = start + cols
    offs = tl.where(idx < head, idx, body_end + idx - head)
    return offs, idx < rest


@triton.jit
def write_row_map(x_ptr, x_start, out_ptr, out_start, V, counted, block_fn: tl.constexpr, fn_args,
                  FN_FLAGS: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr, VEC: tl.constexpr,
                  GRAD_ALIGNED_LIKE_LOGITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = block_fn(x_j (fp32), j, lane mask, fn_args, FN_FLAGS) over one row of V logits at element x_start, written to
    the row at element out_start (a gradient row: row_alignment's GRAD_ALIGNED_LIKE_LOGITS), in row_split's order:
    whole aligned blocks (16-byte loads; 16-byte stores too when the output's rows start at the logits'
    alignment, as they do for contiguous logits and for a gradient written over them), then the masked rest.
    A row that is not counted loads nothing and stores zeros. out may be x itself: each block is read before it
    is stored. block_fn is a @triton.jit function (a constexpr here), fn_args the tuple of its runtime values and
    FN_FLAGS the tuple of its constexpr flags (kept apart: a constexpr unpacked from fn_args is no longer one)."""
    cols = tl.arange(0, BLOCK)
    out_ty = out_ptr.dtype.element_ty
    head, body_end, rest = row_split(x_start, V, VEC, BLOCK)
    full = cols < BLOCK
    for start in range(head, body_end, BLOCK):
        x = tl.load(x_ptr + tl.multiple_of(x_start + start, VEC) + cols, mask=full & counted, other=0.0)
        g = tl.where(counted, block_fn(x.to(tl.float32), start + cols, full, fn_args, FN_FLAGS), 0.0)
        if GRAD_ALIGNED_LIKE_LOGITS:
            out_base = tl.multiple_of(out_start + start, VEC)
        else:
            out_base = out_start + start
        tl.store(out_ptr + out_base + cols, cast_for_store(g, out_ty, BF16_RNE_BY_HAND))
    for start in range(0, rest, BLOCK):
        offs, mask = rest_offsets(start, cols, head, body_end, rest)
        x = tl.load(x_ptr + x_start + offs, mask=mask & counted, other=0.0)
        g = tl.where(counted, block_fn(x.to(tl.float32), offs, mask, fn_args, FN_FLAGS), 0.0)
        tl.store(out_ptr + out_start + offs, cast_for_store(g, out_ty, BF16_RNE_BY_HAND), mask=mask)


def row_alignment(logits: Tensor) -> dict:
    """The constexprs of a row_split kernel over [N, V] ``logits`` (unit column stride) writing a contiguous
    [N, V] gradient: VEC, elements per 16 bytes; GRAD_ALIGNED_LIKE_LOGITS, whether every row of the gradient
    starts at the same offset from a 16-byte boundary as its logits row (then its stores are 16-byte too)."""
    vec = 16 // logits.element_size()
    return dict(VEC=vec, GRAD_ALIGNED_LIKE_LOGITS=(logits.stride(0) - logits.shape[1]) % vec == 0)


def row_config(V: int, device: torch.device, cuda_max_block: int = 8192) -> Tuple[int, int]:
    """(BLOCK, num_warps) for the per-row kernels. On CUDA an 8192-column tile (16 bf16 per thread at
    16 warps) keeps the loads vectorized with few loop trips at V = 32k..256k; ``cuda_max_block`` = 4096
    gives 8 per thread at 16 warps, fewer registers (the cross-entropy kernel: 40 instead of 81 at sm_90,
    3 CTAs per SM instead of 1). Under the interpreter the cost is per program and per op, not per
    element, so the whole row is one tile up to 16384."""
    block = triton.next_power_of_2(V)
    if device.type == "cuda":
        block = min(block, cuda_max_block)
        num_warps = 16 if block >= 4096 and cuda_max_block <= 4096 or block >= 8192 else 8 if block >= 2048 else 4
    else:
        block = min(block, 16384)
        num_warps = 4
    return block, num_warps


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one when it has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_ctx(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def bf16_by_hand(t: Tensor) -> bool:
    # See cast_for_store: only the interpreter (tensors off CUDA) needs bf16 rounding done by hand.
    return t.dtype == torch.bfloat16 and t.device.type != "cuda"


def gradient_buffer(logits: Tensor, out: Optional[Tensor], name: str) -> Tensor:
    """``out`` (checked) or a new tensor like logits. ``out`` may be the logits themselves, contiguous:
    each program reads a row's block before it stores that block's gradient."""
    n, v = logits.shape
    if out is None:
        return torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if out is logits and logits.is_contiguous():  # the chunked heads' call: no storage pointers to compare
        return out
    if out.shape != (n, v) or out.dtype != logits.dtype or not out.is_contiguous() or out.device != logits.device:
        raise ValueError(f"{name}: out must be a contiguous ({n}, {v}) {logits.dtype} tensor on {logits.device}")
    if out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() and not (
            out.data_ptr() == logits.data_ptr() and logits.is_contiguous()):
        raise ValueError(f"{name}: out shares logits' storage, so it must be exactly the (contiguous) logits")
    return out
