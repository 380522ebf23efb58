"""The cross-entropy benchmark on a tiny CPU shape, through pytest-benchmark's fixture.

pyproject's addopts has --benchmark-disable, so each runs its step once as a plain test; time it
with ``python -m pytest tests/benchmarks --benchmark-enable``. Each test also asserts that the
provider agrees with torch eager (loss and gradient), the check the harness makes before timing.
torch-compile is left out here (its compile alone takes 8-30 s on 2 cores); the CLI covers it.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_cross_entropy as bench_ce  # noqa: E402
from benchmarks import harness  # noqa: E402

CFG = bench_ce.make_config("cpu", n=96, v=1003, include_reference=True)


def _provider(bench, name):
    return next(p for p in bench.providers if p.name == name)


@pytest.mark.parametrize("name", ["fastft-cpp", "fastft-reference", "torch-eager"])
def test_bench_cross_entropy(benchmark, name):
    bench = bench_ce.build(CFG)
    provider = _provider(bench, name)
    ok, why = provider.is_available()
    if not ok:
        pytest.skip(f"{name}: {why}")
    diffs = harness.check_agreement(bench, names=[name])
    if name != bench.reference:
        assert set(diffs[name]) == {"loss", "grad"}
    out = benchmark(provider.step, provider.setup())
    expected = torch.nn.functional.cross_entropy(
        bench_ce._inputs(CFG)["logits"].detach(), bench_ce._inputs(CFG)["target"], ignore_index=bench_ce.IGNORE_INDEX
    )
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert out["grad"].shape == (CFG["n"], CFG["v"])


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_mismatching_provider_is_caught(what):
    """A provider with its loss off by 1%, or a zero gradient, must fail the agreement check (the
    harness then never times it)."""
    bench = bench_ce.build(CFG)
    eager = _provider(bench, "torch-eager")

    def broken_step(state):
        out = eager.step(state)
        if what == "loss":
            return {"loss": out["loss"] * 1.01, "grad": out["grad"]}
        return {"loss": out["loss"], "grad": torch.zeros_like(out["grad"])}

    bench.providers.append(harness.Provider("broken", eager.setup, broken_step))
    with pytest.raises(AssertionError, match=f"broken: {what}"):
        harness.check_agreement(bench, names=["broken"])
    ok, diffs, _ = harness.compare({"loss": torch.tensor(float("nan"))}, {"loss": torch.tensor(1.0)}, bench.tolerances)
    assert not ok
