"""The LoRA benchmark on tiny CPU shapes: every provider agrees with PEFT eager before it could be timed
(the check the harness makes). torch.compile is
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
    cfg = bench_lora.make_config("cpu", n=37, in_features=48, out_features=40, r=4, lora_alpha=8)
    bench = bench_lora.build(cfg)
    diffs = harness.check_agreement(bench, names=["fastft-cpp", "base-frozen"])
    assert set(diffs["fastft-cpp"]) == {"y", "dx"}


def test_interleaved_pairs_each_provider_with_its_baseline(tmp_path):
    """harness.interleaved (the --interleave CLI): every live provider gets a row, the baseline's ratio to
    itself is exactly 1, ratios are positive, and the json/md files are written."""
    cfg = bench_lora.make_config("cpu", n=16, in_features=32, out_features=24, r=4, lora_alpha=8)
    bench = bench_lora.build(cfg)
    bench.providers = [p for p in bench.providers if p.name in ("fastft-cpp", "peft-eager", "base-frozen")]
    rows = harness.interleaved(bench, rounds=3, out_dir=tmp_path)
    by_name = {r["provider"]: r for r in rows}
    assert set(by_name) == {"fastft-cpp", "peft-eager", "base-frozen"}
    assert by_name["base-frozen"]["time / base-frozen"] == 1.0
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert r["time / peft-eager"] > 0
    assert (tmp_path / "lora_linear_cpu_interleaved.json").exists()
    md = (tmp_path / "lora_linear_cpu_interleaved.md").read_text()
    assert "time / base-frozen" in md
    assert "*median over rounds of this step / base-frozen's step (<1 faster)*" in md  # the table explains itself
