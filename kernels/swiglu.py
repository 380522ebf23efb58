"""Triton SwiGLU gated product (the "triton" backend of fastft.ops.swiglu), element-wise over flat tensors.

    forward   out = round(silu(a)) b,   silu(a) = a sigmoid(a)      (round: to the inputs' dtype, as eager
                                                                     F.silu(gate) * up rounds between the ops)
    backward  d_up   = dout silu(a)
              d_gate = dout b sigmoid(a) (1 + a (1 - sigmoid(a)))

Backward recomputes sigmoid(a) from the saved inputs (as Liger-Kernel's LigerSiLUMulFunction), so nothing but
gate and up is kept between the passes. Values are loaded, cast to fp32, computed on and cast on store
(bf16 arithmetic is also wrong in the interpreter).

Launchers (what fastft.ops.swiglu calls for backend "triton"), on contiguous tensors of one shape and dtype:
  swiglu_fwd(gate, up) -> out
  swiglu_bwd(grad_out, gate, up, need_gate, need_up) -> (d_gate, d_up), each an empty (0,) tensor when not needed
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from ._common import bf16_by_hand, cast_for_store, device_ctx


__all__ = ["swiglu_fwd", "swiglu_bwd"]


@triton.jit
def _swiglu_fwd_tile(gate_ptr, up_ptr, out_ptr, offs, mask, other, RNE: tl.constexpr):
    # mask and other: both None (a whole block) or both set (the tail).
    a = tl.load(gate_ptr + offs, mask=mask, other=other).to(tl.float32)
    b = tl.load(up_ptr + offs, mask=mask, other=other).to(tl.float32)
    act = cast_for_store(a * tl.sigmoid(a), out_ptr.dtype.element_ty, RNE).to(tl.float32)
    tl.store(out_ptr + offs, cast_for_store(act * b, out_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, RNE: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    # Every block but the last is whole: unmasked, so it loads 16-byte vectors whatever n is; the tail is masked.
    if start + BLOCK <= n:
        _swiglu_fwd_tile(gate_ptr, up_ptr, out_ptr, offs, None, None, RNE)
    else:
        _swiglu_fwd_tile(gate_ptr, up_ptr, out_ptr, offs, offs < n, 0.0, RNE)


@triton.jit
def _swiglu_bwd_tile(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, offs, mask, other, RNE: tl.constexpr,
                     HAS_D_GATE: tl.constexpr, HAS_D_UP: tl.constexpr):
    g = tl.load(grad_ptr + offs, mask=mask, other=other).to(tl.float32)
    a = tl.load(gate_ptr + offs, mask=mask, other=other).to(tl.float32)
    sig = tl.sigmoid(a)
    if HAS_D_UP:
        tl.store(d_up_ptr + offs, cast_for_store(g * a * sig, d_up_ptr.dtype.element_ty, RNE), mask=mask)
    if HAS_D_GATE:
        b = tl.load(up_ptr + offs, mask=mask, other=other).to(tl.float32)
        d_gate = g * b * sig * (1.0 + a * (1.0 - sig))
        tl.store(d_gate_ptr + offs, cast_for_store(d_gate, d_gate_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, n, RNE: tl.constexpr,
                       HAS_D_GATE: tl.constexpr, HAS_D_UP: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # whole block: unmasked 16-byte vectors (see the forward kernel)
        _swiglu_bwd_tile(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, offs, None, None, RNE, HAS_D_GATE, HAS_D_UP)
    else:
        _swiglu_bwd_tile(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, offs, offs < n, 0.0, RNE, HAS_D_GATE,
                         HAS_D_UP)


def _block(device: torch.device) -> Tuple[int, int]:
    """(BLOCK, num_warps): 1024-element tiles on CUDA (8 fp32 per thread at 4 warps); under the interpreter the
    cost is per program, so tiles are large."""
    return (1024, 4) if device.type == "cuda" else (65536, 4)


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n == 0:
        return out
    block, num_warps = _block(gate.device)
    with device_ctx(gate):
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, out, n, RNE=bf16_by_hand(out), BLOCK=block,
                                                     num_warps=num_warps)
    return out


def swiglu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor, need_gate: bool, need_up: bool) -> Tuple[Tensor, Tensor]:
    def output(needed: bool) -> Tensor:
        return torch.empty_like(gate, memory_format=torch.contiguous_format) if needed else gate.new_empty((0,))

    d_gate, d_up = output(need_gate), output(need_up)
    n = gate.numel()
    if n == 0 or not (need_gate or need_up):
        return d_gate, d_up
    block, num_warps = _block(gate.device)
    with device_ctx(gate):
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](
            grad_out, gate, up, d_gate if need_gate else gate, d_up if need_up else gate, n, RNE=bf16_by_hand(gate),
            HAS_D_GATE=need_gate, HAS_D_UP=need_up, BLOCK=block, num_warps=num_warps,
        )
    return d_gate, d_up
