"""The model-step benchmark on a tiny config-built Llama: every provider (PEFT + stock loss, PEFT + fastft's
head, fastft's LoRA + stock loss, all of fastft) gives PEFT's loss and LoRA gradients before it could be
timed, with the prompt tokens unlabelled; tokens/s is reported."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("peft")
from benchmarks import bench_model_step  # noqa: E402
from benchmarks import harness  # noqa: E402


CFG = bench_model_step.make_config("cpu", model="tiny", layers=1, vocab=96, batch=2, seq=16, prompt=5)


def test_every_provider_agrees_with_peft():
    bench = bench_model_step.build(CFG)
    names = ["peft+fastft-head", "fastft-lora+stock", "fastft"]
    diffs = harness.check_agreement(bench, names=names)
    assert set(diffs) == set(names)
    for name in names:
        assert set(diffs[name]) == {"loss", "lora_grads"}
    liger = next(p for p in bench.providers if p.name == "liger")
    ok, why = liger.is_available()
    assert not ok and "CUDA only" in why


@pytest.mark.parametrize("name, parts", [("peft+fastft-head", {"loss"}), ("fastft-lora+stock", {"lora"}),
                                         ("fastft", {"loss", "lora", "layers"})])
def test_each_provider_patches_what_it_names(name, parts):
    """Agreement alone would also hold if a patch did nothing: each provider's fastft.patch report lists
    its parts as fused, and only those."""
    report = bench_model_step._state(CFG, bench_model_step.PATCHES[name])["patch"]
    assert {part for part in ("loss", "lora", "layers") if report.fused(part)} == parts


def test_tokens_per_second_column(tmp_path):
    bench = bench_model_step.build(CFG)
    bench.providers = [p for p in bench.providers if p.name in ("peft+stock", "fastft")]
    rows = harness.run(bench, harness.Options(warmup=0, repeats=2, memory=False, inprocess=True), "benchmarks.bench_model_step")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r["tokens_s"] == pytest.approx(2 * 16 / (r["median_ms"] * 1e-3))
    assert "tokens/s" in harness.table(bench, rows)
