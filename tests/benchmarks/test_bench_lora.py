"""The LoRA benchmark on tiny CPU shapes: every provider agrees with PEFT eager before it could be timed
(the check the harness makes), for the single-layer case and the small-Llama step. torch.compile is
left out (its compile alone takes tens of seconds on 2 cores); the CLI covers it."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("peft")
from benchmarks import bench_lora  # noqa: E402
from benchmarks import harness  # noqa: E402


def test_bench_lora_layer_providers_agree():
    cfg = bench_lora.make_config("cpu", "layer", n=37, in_features=48, out_features=40, r=4, lora_alpha=8)
    bench = bench_lora.build(cfg)
    diffs = harness.check_agreement(bench, names=["fastft-cpp", "base-frozen"])
    assert set(diffs["fastft-cpp"]) == {"y", "dx"}


def test_bench_lora_llama_step_agrees():
    cfg = bench_lora.make_config("cpu", "llama", hidden=32, intermediate=48, layers=1, heads=2, vocab=64, batch=2,
                                 seq=8, r=4, lora_alpha=8)
    diffs = harness.check_agreement(bench_lora.build(cfg), names=["fastft"])
    assert set(diffs["fastft"]) == {"loss", "lora_grads"}
