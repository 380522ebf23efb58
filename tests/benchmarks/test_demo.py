"""`make demo`'s comparison (benchmarks/demo.py): its expected duration is a measured one, never typed in."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import demo  # noqa: E402


def test_expected_duration_is_the_last_run_of_the_same_variant(tmp_path):
    assert demo.expected_duration(tmp_path, quick=True).startswith("unknown")  # no run yet
    (tmp_path / "comparison.json").write_text(json.dumps({"quick": True, "demo_seconds": 42.4,
                                                          "load_average_at_start": [1.25, 1.0, 0.5]}))
    assert demo.expected_duration(tmp_path, quick=True) == (
        f"about 42 s (the last quick run in {tmp_path}/ took that at load average 1.2)")
    assert demo.expected_duration(tmp_path, quick=False).startswith("unknown")  # a quick run says nothing of a full one
    (tmp_path / "comparison.json").write_text("{broken")
    assert demo.expected_duration(tmp_path, quick=True).startswith("unknown")
