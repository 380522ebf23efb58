"""sm_90 compile specs (tests/kernels/sm90_compile.py) of the low-rank and row kernels at the launch configurations
production uses on CUDA: bf16, hidden 4096, LoRA r = 16, adapter r = 64. Block sizes and warps come from the
launchers' own config functions, so the figures follow the code. Pointers are 16-byte aligned (as torch's
allocator gives). Ints: the GEMM specs mark sizes and strides divisible by 16, as the JIT specialises them at
those shapes; the row kernels are compiled both ways ("jit16": as the JIT compiles them at H = 4096; "any":
unspecialised, as for a width or row count the JIT cannot prove divisible by 16)."""
from __future__ import annotations

import torch

K = "fastft.kernels"
HIDDEN = 4096
CUDA = torch.device("cuda")


def lora_specs(dtype: str = "bf16", drop: bool = True, stages=None) -> list:
    from fastft.kernels import lora

    cfg = lora._config(CUDA, torch.bfloat16 if dtype == "bf16" else torch.float32)
    # Sizes and strides at 8192 x 4096 -> 4096: all multiples of 16, which the JIT specialises ("i32:16").
    common = dict(UPCAST=False, DOT_PRECISION="ieee", BF16_RNE_BY_HAND=False, BLOCK_R=16)
    down = dict(x_ptr=f"*{dtype}", l1_ptr=f"*{dtype}", inner_ptr=f"*{dtype}", seed_ptr="*i64", M="i32:16", K="i32:16",
                R="i32:16", stride_xm="i32:16", stride_xk=1, stride_l1k=1, stride_l1r="i32:16", stride_im="i32:16", stride_ir=1,
                drop_threshold="i32", keep_scale="fp32", DROP_IN=drop, BLOCK_M=cfg["DOWN_BLOCK_M"],
                BLOCK_K=cfg["DOWN_BLOCK_K"], **common)
    gemm = dict(x_ptr=f"*{dtype}", m_ptr=f"*{dtype}", inner_ptr=f"*{dtype}", l2_ptr=f"*{dtype}", bias_ptr=f"*{dtype}",
                out_ptr=f"*{dtype}", seed_ptr="*i64", M="i32:16", N="i32:16", K="i32:16", R="i32:16",
                stride_xm="i32:16", stride_xk=1, stride_mk=1, stride_mn="i32:16", stride_im="i32:16", stride_ir=1,
                stride_l2r=1, stride_l2n="i32:16", stride_om="i32:16", stride_on=1, scaling="fp32", drop_threshold="i32",
                keep_scale="fp32", HAS_BIAS=False, DROP_OUT=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], **common)
    return [
        (K + ".lora", "_lora_down_kernel", down, dict(num_warps=cfg["down_warps"], num_stages=cfg["down_stages"]),
         f"{dtype} r=16 drop={int(drop)}"),
        (K + ".lora", "_lora_matmul_kernel", gemm,
         dict(num_warps=cfg["num_warps"], num_stages=stages or cfg["num_stages"]), f"{dtype} fwd"),
    ]


def _ints(spec: str, *names: str) -> dict:
    return {name: spec for name in names}


def rms_norm_specs(ints: str) -> list:
    """ints: "i32:16" (jit16, as the JIT compiles H = 4096) or "i32" (any: unspecialised)."""
    from fastft.kernels import rms_norm

    block_m, block_h, warps = rms_norm._blocks(HIDDEN, CUDA)
    label = f"H={HIDDEN} " + ("jit16" if ints.endswith(":16") else "any")
    common = dict(GEMMA=False, RNE_X=False, ALIGN=8, BLOCK_M=block_m, BLOCK_H=block_h)
    fwd = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", rstd_ptr="*fp32", n_rows="i32", eps="fp32",
               offset="fp32", RNE_Y=False, **_ints(ints, "n_cols", "x_row_stride", "y_row_stride"), **common)
    bwd = dict(dy_ptr="*bf16", x_ptr="*bf16", w_ptr="*bf16", rstd_ptr="*fp32", dx_ptr="*bf16", dw_partial_ptr="*fp32",
               n_rows="i32", rows_per_program="i32", offset="fp32", HAS_DX=True, HAS_DW=True,
               **_ints(ints, "n_cols", "dy_row_stride", "x_row_stride", "dx_row_stride"), **common)
    options = dict(num_warps=warps, num_stages=1)
    return [(K + ".rms_norm", "_rms_norm_fwd_kernel", fwd, options, label),
            (K + ".rms_norm", "_rms_norm_bwd_kernel", bwd, options, label)]


def swiglu_specs(ints: str) -> list:
    from fastft.kernels import swiglu

    block, warps = swiglu._block(CUDA)
    label = "jit16" if ints.endswith(":16") else "any"
    fwd = dict(gate_ptr="*bf16", up_ptr="*bf16", out_ptr="*bf16", n=ints, RNE=False, BLOCK=block)
    bwd = dict(grad_ptr="*bf16", gate_ptr="*bf16", up_ptr="*bf16", d_gate_ptr="*bf16", d_up_ptr="*bf16", n=ints,
               RNE=False, HAS_D_GATE=True, HAS_D_UP=True, BLOCK=block)
    options = dict(num_warps=warps, num_stages=1)
    return [(K + ".swiglu", "_swiglu_fwd_kernel", fwd, options, label),
            (K + ".swiglu", "_swiglu_bwd_kernel", bwd, options, label)]


def adapter_specs(per_program=None) -> list:
    """The bottleneck epilogue at r = 64, gelu, dropout, with an up bias (h is [N, 72])."""
    from fastft.kernels import adapter

    block_m, block_r, warps = adapter._config(8192, 64, CUDA)
    if per_program is not None:
        block_m = per_program // block_r
    specs = []
    for backward in (False, True):
        args = dict(pre_ptr="*bf16", grad_h_ptr="*bf16", seed_ptr="*i64", h_ptr="*bf16", grad_pre_ptr="*bf16",
                    N="i32", R="i32:16", h_stride="i32", threshold="i32", keep_scale="fp32", grad_scale="fp32",
                    ACTIVATION=1, HAS_DROPOUT=True, APPEND_ONES=True, BACKWARD=backward, RETURN_H=True,
                    BF16_RNE_BY_HAND=False, BLOCK_M=block_m, BLOCK_R=block_r, PAD_BLOCK=8)
        specs.append((K + ".adapter", "_adapter_act_dropout_kernel", args, dict(num_warps=warps, num_stages=1),
                      f"r=64 gelu drop {'bwd' if backward else 'fwd'} {block_m}x{block_r}"))
    return specs


def test_specs() -> list:
    """The subset tests/test_lowrank_sm90.py compiles (the figures it asserts; ~half the compile time)."""
    return lora_specs("bf16") + rms_norm_specs("i32") + swiglu_specs("i32") + adapter_specs()


def production_specs() -> list:
    return (lora_specs("bf16") + lora_specs("fp32") + rms_norm_specs("i32:16") + rms_norm_specs("i32")
            + swiglu_specs("i32:16") + swiglu_specs("i32") + adapter_specs())
