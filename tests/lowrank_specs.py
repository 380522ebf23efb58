"""sm_90 compile specs (tests/sm90_compile.py) of the low-rank and row kernels at the launch configurations
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


def production_specs() -> list:
    return lora_specs("bf16") + lora_specs("fp32")
