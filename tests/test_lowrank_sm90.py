"""The low-rank and row kernels as the GPU gets them, checked without a GPU: each is compiled ahead of time for
sm_90 (tests/sm90_compile.py, tests/lowrank_specs.py: the launchers' production configurations) and its TTIR,
PTX and cubin are read. One child-process compile for the module (~1 min on this CPU)."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("triton")

import lowrank_specs  # noqa: E402
import sm90_compile  # noqa: E402

_ADDPTR = re.compile(r"tt\.addptr .*: tensor<[^>]*!tt\.ptr<\w+>>, tensor<[0-9x]+x(i\d+)>")


@pytest.fixture(scope="module")
def compiled():
    return {(r["name"], r["label"]): r for r in sm90_compile.compile_kernels(lowrank_specs.production_specs())}


def _pick(compiled, name, label_part=""):
    found = [r for (n, label), r in compiled.items() if n == name and label_part in label]
    assert found, f"no compiled {name} {label_part!r} in {sorted(compiled)}"
    return found


@pytest.mark.parametrize("kernel", ["_lora_matmul_kernel", "_lora_down_kernel"])
def test_lora_tile_offsets_are_int64(compiled, kernel):
    # W has out * in elements: >= 2^31 for a LoRA'd 256k-vocabulary head, so an int32 offset wraps.
    for result in _pick(compiled, kernel):
        widths = _ADDPTR.findall(result["ttir"])
        assert widths, "no tensor tt.addptr found in the TTIR"
        assert set(widths) == {"i64"}, f"{kernel} {result['label']}: offset widths {sorted(set(widths))}"


def test_lora_gemm_lean(compiled):
    # The rank-r product moved out of the GEMM's K loop: no spill, and less than the 192 registers /
    # 102 KB of the fused version (sm_90, bf16, 128x128x64, 3 stages).
    for result in _pick(compiled, "_lora_matmul_kernel"):
        assert result["stack_bytes"] == 0
        assert result["registers"] < 192 and result["shared_bytes"] < 100 * 1024, result["label"]
