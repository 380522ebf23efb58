"""The linear cross-entropy benchmark on a tiny CPU shape: each provider runs one step (pytest-benchmark
is disabled by default; enable it to time) and must agree with torch eager on the loss and both
gradients, the check the harness makes before timing. torch-compile is left to the CLI (slow compile)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_linear_cross_entropy as bench_lce  # noqa: E402
from benchmarks import harness  # noqa: E402

CFG = bench_lce.make_config("cpu", n=96, h=40, v=1003)


@pytest.mark.parametrize("name", ["fastft-cpp", "torch-eager", "torch-lce", "torch-lce-chunked"])
def test_bench_linear_cross_entropy(benchmark, name):
    bench = bench_lce.build(CFG)
    provider = next(p for p in bench.providers if p.name == name)
    ok, why = provider.is_available()
    if not ok:
        pytest.skip(f"{name}: {why}")
    diffs = harness.check_agreement(bench, names=[name])
    if name != bench.reference:
        assert set(diffs[name]) == {"loss", "grad_x", "grad_w"}
    out = benchmark(provider.step, provider.setup())
    assert out["grad_x"].shape == (CFG["n"], CFG["h"]) and out["grad_w"].shape == (CFG["v"], CFG["h"])
    assert torch.isfinite(out["loss"])
