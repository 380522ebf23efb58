"""How long a run is expected to take, from the committed reference results (printed first by `make bench`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .paths import RESULTS_DIR, ROOT


# A provider subprocess's cost beyond its steps (interpreter, torch and fastft imports, setup): used only
# to estimate a run's duration from reference results that predate the per-provider wall time.
PROCESS_OVERHEAD_S = 5.0


def reference_seconds(op: str, device: str, results_dir: Path = RESULTS_DIR) -> Optional[float]:
    """How long the committed reference run of ``op`` on ``device`` took: the sum of its providers'
    wall times, or, for results written before those were recorded, an estimate from its steps
    (process start + first call + (warmup + repeats + memory steps) x median). None without one."""
    path = results_dir / f"{op}_{device}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows, options = data.get("results", []), data.get("meta", {}).get("options", {})
    steps = options.get("warmup", 3) + options.get("repeats", 15) + options.get("mem_steps", 2)
    total = 0.0
    for r in rows:
        if "wall_s" in r:
            total += r["wall_s"]
        elif r.get("status") == "ok":
            total += PROCESS_OVERHEAD_S + r.get("first_call_s", 0.0) + steps * r.get("median_ms", 0.0) / 1e3
    return total


def expected_duration_text(device: str, results_dir: Path = RESULTS_DIR, ops: Optional[list] = None,
                           quick: bool = False) -> str:
    """One line for the start of `make bench`: the expected duration of the benchmarks ``ops`` (all with a
    reference result when None) from the reference results, which are full-size runs: a ``--quick`` run
    (small shapes, a few repeats) has no reference, and the line says so instead of a full run's figure."""
    if quick:
        return ("expected duration: short (--quick: small shapes and a few repeats; the reference runs in "
                "benchmarks/results are full-size, so they give no figure for it)")
    per_op = {}
    for path in sorted(results_dir.glob(f"*_{device}.json")):
        op = path.name[: -len(f"_{device}.json")]
        seconds = reference_seconds(op, device, results_dir)
        if seconds is not None and (ops is None or op in ops):
            per_op[op] = seconds
    if not per_op:
        return f"expected duration: unknown (no reference results for {device} in {results_dir})"
    parts = ", ".join(f"{op} {s / 60:.1f}" for op, s in per_op.items())
    minutes = sum(per_op.values()) / 60
    return (f"expected duration: about {minutes:.{0 if minutes >= 10 else 1}f} min on {device} ({parts} min, from the "
            f"reference runs in {results_dir.relative_to(ROOT) if results_dir.is_relative_to(ROOT) else results_dir}; "
            "ops without one come on top)")
