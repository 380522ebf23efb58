"""The benchmark harness's reporting: where results go (never the committed ones by default), tables
that say what each column means, outputs compared with dropout off, plots, the expected duration."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_adapter, harness  # noqa: E402

TINY_ADAPTER = dict(n=48, hidden=32, r=8, dropout=0.5)


def test_default_out_dir_is_git_ignored_and_not_the_reference_results():
    args = harness.parser_for(bench_adapter).parse_args([])
    assert args.out_dir == harness.OUT_DIR != harness.RESULTS_DIR
    git = subprocess.run(["git", "check-ignore", "-q", str(harness.OUT_DIR / "adapter_cpu.json")], cwd=ROOT)
    if git.returncode == 128:
        pytest.skip("not a git checkout")
    assert git.returncode == 0, "benchmarks/out/ must be ignored by git (make bench leaves the tree clean)"


def test_adapter_outputs_are_compared_with_dropout_off():
    """The timed step draws dropout masks (they differ between providers); the check step does not, so
    every output, the weight gradient included, must match the eager block to rounding."""
    bench = bench_adapter.build(bench_adapter.make_config("cpu", **TINY_ADAPTER))
    assert bench.tolerances == {"*": (1e-5, 1e-4)} and bench.check_note == "dropout off"
    diffs = harness.check_agreement(bench, names=["fastft-cpp"])
    assert set(diffs["fastft-cpp"]) == {"y", "dx", "d_up_weight"}
    eager = next(p for p in bench.providers if p.name == "torch-eager")
    state = eager.setup()
    timed, checked = eager.step(state)["y"].clone(), eager.check_step(state)["y"]
    assert not torch.allclose(timed, checked)  # the timed step really uses dropout


def _rows():
    return [
        {"provider": "fastft-cpp", "status": "ok", "median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.2, "peak_extra_mb": 0.0,
         "held_mb": 40.0, "first_call_s": 0.1, "wall_s": 6.5, "max_diff": {"y": 1e-7}, "vs torch-eager": 2.0},
        {"provider": "torch-eager", "status": "ok", "median_ms": 4.0, "p20_ms": 3.8, "p80_ms": 4.4,
         "peak_extra_mb": 30.0, "held_mb": 1.0, "first_call_s": 0.1, "wall_s": 7.5, "vs torch-eager": 1.0},
        {"provider": "liger", "status": "unavailable", "reason": "CUDA only", "wall_s": 0.0},
    ]


def _bench():
    return harness.Benchmark(op="toy", device="cpu", config={}, providers=[], description="a toy op " * 30,
                             reference="torch-eager", baselines=("torch-eager",), check_note="dropout off")


def test_table_says_what_each_column_means():
    lines = harness.table(_bench(), _rows()).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    meaning = dict(zip(head, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert meaning["peak extra MB"] == "*step peak above between-steps*"
    assert meaning["held MB"] == "*kept between steps, beyond inputs*"
    assert "dropout off" in meaning["max diff vs torch-eager"]
    assert meaning["vs torch-eager"] == "*torch-eager median / this (>1 faster)*"
    assert all(meaning[c] != "**" for c in head)  # every column explained


def test_save_writes_where_asked_and_the_expected_duration_reads_it(tmp_path):
    bench, rows = _bench(), _rows()
    meta = harness.metadata(bench, harness.Options())
    paths = harness.save(bench, rows, meta, tmp_path)
    assert {p.suffix for p in paths} >= {".csv", ".json", ".md"} and all(p.parent == tmp_path for p in paths)
    report = (tmp_path / "toy_cpu.md").read_text()
    assert "The table's first row repeats what each column means" in report
    (tmp_path / "toy_cpu.md").unlink()
    harness.redraw(tmp_path)  # from the JSON alone: the same report
    assert (tmp_path / "toy_cpu.md").read_text() == report
    assert harness.reference_seconds("toy", "cpu", tmp_path) == pytest.approx(14.0)
    assert "toy 0.2" in harness.expected_duration_text("cpu", tmp_path)
    # only the selected benchmarks count; a --quick run has no full-size reference to quote
    assert "unknown" in harness.expected_duration_text("cpu", tmp_path, ops=["other"])
    assert "toy 0.2" in harness.expected_duration_text("cpu", tmp_path, ops=["toy"])
    quick = harness.expected_duration_text("cpu", tmp_path, ops=["toy"], quick=True)
    assert "--quick" in quick and "min" not in quick
    # results written before wall times were recorded: estimated from their steps
    data = json.loads((tmp_path / "toy_cpu.json").read_text())
    for r in data["results"]:
        r.pop("wall_s")
    (tmp_path / "toy_cpu.json").write_text(json.dumps(data))
    steps = meta["options"]["warmup"] + meta["options"]["repeats"] + meta["options"]["mem_steps"]
    expected = sum(harness.PROCESS_OVERHEAD_S + 0.1 + steps * ms / 1e3 for ms in (2.0, 4.0))
    assert harness.reference_seconds("toy", "cpu", tmp_path) == pytest.approx(expected)


def test_plot_has_time_and_memory_side_by_side_and_a_wrapped_title(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    real_savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    meta = harness.metadata(_bench(), harness.Options())
    plt.Figure.savefig = capture
    try:
        path = harness.plot(_bench(), _rows(), meta, tmp_path / "toy.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert path.exists() and path.stat().st_size > 0
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["time", "peak memory"]
    title = fig._suptitle.get_text()
    assert "\n" in title and max(len(line) for line in title.splitlines()) <= 140  # wrapped to the figure
    footer = " ".join(t.get_text() for t in fig.texts)
    assert f"torch {torch.__version__}" in footer and meta["cpu"] in footer.replace("\n", " ")


def test_interleave_runs_every_step_each_round_and_times_only_after_the_warmup():
    calls = []
    times = harness.interleave({"a": lambda r: calls.append(("a", r)), "b": lambda r: calls.append(("b", r))},
                               rounds=3, warmup_rounds=1, alternate=True)
    # round r passes r (the trainer uses it as the step); odd rounds run in reverse order
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in times.values() for t in v)
    calls.clear()
    harness.interleave({"a": lambda r: calls.append("a"), "b": lambda r: calls.append("b")}, rounds=2, warmup_rounds=0)
    assert calls == ["a", "b", "a", "b"]
