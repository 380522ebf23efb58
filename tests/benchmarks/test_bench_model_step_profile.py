"""The model-step profile that benchmarks/gpu_check.sh writes into summary.md: its table builder and the
fused-head span, on a CPU profile (the same torch.profiler objects a CUDA profile gives, CPU times)."""
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_model_step import head_span_ms, profile_table, top_kernels  # noqa: E402


def _profiled(steps: int, with_head: bool):
    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            torch.mm(a, a)
            if with_head:
                with record_function("fastft::linear_cross_entropy"):  # the fused head's op name
                    torch.mm(a, a).sum()
    return prof


def test_top_kernels_counts_calls_and_time():
    prof = _profiled(steps=2, with_head=True)
    rows = top_kernels(prof, limit=50, on_device=False)
    by_name = {name: (calls, ms) for name, calls, ms in rows}
    assert by_name["aten::mm"][0] == 4 and by_name["aten::mm"][1] > 0
    assert [ms for _, _, ms in rows] == sorted((ms for _, _, ms in rows), reverse=True)
    assert len(top_kernels(prof, limit=1, on_device=False)) == 1


def test_head_span_from_first_to_last_head_event():
    prof = _profiled(steps=2, with_head=True)
    span_ms, events = head_span_ms(prof)
    assert events == 2
    heads = [e for e in prof.events() if e.name == "fastft::linear_cross_entropy"]
    expected = (max(e.time_range.end for e in heads) - min(e.time_range.start for e in heads)) / 1000.0
    assert span_ms == expected and span_ms > 0
    assert head_span_ms(_profiled(steps=1, with_head=False)) is None


def test_profile_table_markdown():
    table = profile_table("fastft", _profiled(steps=2, with_head=True), steps=2, limit=5, on_device=False)
    assert table.startswith("#### fastft")
    assert "| `aten::mm` | 4 |" in table
    assert "Fused head: first to last of its 2 events" in table
    table = profile_table("peft+stock", _profiled(steps=1, with_head=False), steps=1, limit=5, on_device=False)
    assert "Fused head: none in this step" in table
