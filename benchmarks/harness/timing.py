"""Timing: steps timed one after another (CUDA events with an L2 flush, or perf_counter), and interleaved rounds
(every contender one step per round, for a CPU shared with other jobs) - the one interleaving helper of the
op benchmarks and of benchmarks/runtime_measure.py."""
from __future__ import annotations

import time
from typing import Callable


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_steps(step, state, device: str, repeats: int, max_time_s: float) -> list[float]:
    """Milliseconds per step."""
    if device == "cuda":
        import torch

        # 256 MB zeroed before each step: evicts the L2 (50-60 MB on H100/H200), as do_bench does.
        flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")
        times: list[float] = []
        deadline = time.perf_counter() + max_time_s
        while len(times) < repeats:
            batch = min(10, repeats - len(times))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
            for start, end in events:
                flush.zero_()
                start.record()
                step(state)
                end.record()
            torch.cuda.synchronize()
            times += [s.elapsed_time(e) for s, e in events]
            if len(times) >= 3 and time.perf_counter() > deadline:
                break
        return times
    times = []
    deadline = time.perf_counter() + max_time_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(state)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() > deadline:
            break
    return times


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def interleave(steps: dict, rounds: int, warmup_rounds: int = 1, alternate: bool = False,
               sync_device: Callable[[], None] = lambda: None) -> dict:
    """Round-robin timing in one process: every round runs each of ``steps`` (name -> ``fn(round)``) once, so a
    load spike hits all of them alike; the ``warmup_rounds`` first rounds are not timed. ``alternate``: odd
    rounds run the steps in reverse order, so none always runs right after the same other one. Returns
    {name: [ms per timed round]}: the ratios to quote are per-round pairs (``quantile`` of this / that)."""
    times: dict = {name: [] for name in steps}
    for r in range(warmup_rounds + rounds):
        order = list(steps)[::-1] if alternate and r % 2 else list(steps)
        for name in order:
            sync_device()
            t0 = time.perf_counter()
            steps[name](r)
            sync_device()
            if r >= warmup_rounds:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times
