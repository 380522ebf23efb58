"""The low-rank and row kernels as the GPU gets them, checked without a GPU: each is compiled ahead of time for
sm_90 (tests/kernels/sm90_compile.py, tests/kernels/lowrank_specs.py: the launchers' production configurations) and its TTIR,
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
    return {(r["name"], r["label"]): r for r in sm90_compile.compile_kernels(lowrank_specs.test_specs())}


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


@pytest.mark.parametrize("kernel", ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel",
                                    "_swiglu_bwd_kernel"])
def test_row_kernels_load_16_byte_vectors_without_jit_specialisation(compiled, kernel):
    # "any": widths and strides the JIT cannot prove divisible by 16 (before: scalar loads only, 0 v4).
    for result in _pick(compiled, kernel, "any"):
        assert result["v4_loads"] >= 2, (result["label"], result["v4_loads"], result["narrower_loads"])
        if kernel.startswith("_rms_norm"):  # the whole row is one tile: every row load is a vector (rstd is not)
            assert result["narrower_loads"] <= 1


@pytest.mark.parametrize("kernel", ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel",
                                    "_swiglu_bwd_kernel", "_adapter_act_dropout_kernel"])
def test_row_kernels_two_ctas_per_sm_no_spill(compiled, kernel):
    # A bandwidth-bound row kernel at 1 CTA/SM cannot hide memory latency (RMSNorm backward was 144 registers,
    # 1 CTA/SM; the adapter epilogue 255 registers).
    for result in _pick(compiled, kernel):
        assert result["stack_bytes"] == 0, result["label"]
        assert result["ctas_per_sm"] >= 2, (result["label"], result["registers"])
    if kernel == "_adapter_act_dropout_kernel":
        assert max(r["registers"] for r in _pick(compiled, kernel)) <= 128


def test_ctas_per_sm_arithmetic():
    # sm_90: 65,536 registers (allocated per warp in units of 256), 2,048 threads, 228 KB shared memory per SM.
    assert sm90_compile.ctas_per_sm(144, 256, 8192) == 1
    assert sm90_compile.ctas_per_sm(109, 256, 8192) == 2
    assert sm90_compile.ctas_per_sm(32, 128, 0) == 16
    assert sm90_compile.ctas_per_sm(64, 256, 120 * 1024) == 1
