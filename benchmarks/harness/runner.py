"""Running a benchmark: each provider in a fresh subprocess (or in-process), the reference first; or all
providers interleaved in one process."""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .check import check_agreement, compare
from .memory import cpu_peak, cuda_peak, memory_now_mb
from .paths import ROOT
from .providers import Benchmark, Options, Provider
from .report import metadata
from .timing import interleave, quantile, sync, time_steps

_MARK = "@@FASTFT_BENCH_RESULT@@"


def run_provider(bench: Benchmark, provider: Provider, opts: Options, ref: Optional[dict]) -> tuple[dict, dict]:
    """Set up, check against ``ref`` (sampled reference outputs; None: this is the reference),
    warm up, measure memory, time. Returns (result row, sampled outputs)."""
    row: dict = {"provider": provider.name, "status": "ok", "reason": ""}
    device = bench.device
    measure_mem = opts.memory and opts.mem_steps > 0 and (device == "cuda" or not opts.inprocess)
    state = provider.setup()
    sync(device)
    mem_inputs = memory_now_mb(device) if measure_mem else 0.0  # inputs built, nothing run yet
    t0 = time.perf_counter()
    out = provider.step(state)
    sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    outs = provider.checked_outputs(state, out)
    del out
    if ref is not None:
        ok, diffs, why = compare(outs, ref, bench.tolerances)
        row["max_diff"] = diffs
        if not ok:
            row.update(status="mismatch", reason=f"disagrees with {bench.reference}: {why}")
            return row, outs
    for _ in range(opts.warmup):
        provider.step(state)
    sync(device)
    times = time_steps(provider.step, state, device, opts.repeats, opts.max_time_s)
    # After the timing (see memory._pin_malloc). On CPU only in a fresh process: pinning malloc there would
    # change the timing of the providers run after this one.
    # peak_extra_mb: a step's peak above the memory between steps; held_mb: what the provider keeps
    # between steps beyond its inputs (buffer caches; on CPU also compiled code and the like).
    if measure_mem:
        base, row["peak_extra_mb"], row["memory_method"] = (cuda_peak if device == "cuda" else cpu_peak)(
            provider.step, state, opts.mem_steps)
        row["held_mb"] = base - mem_inputs
    row.update(
        repeats=len(times),
        median_ms=quantile(times, 0.5),
        p20_ms=quantile(times, 0.2),
        p80_ms=quantile(times, 0.8),
    )
    if bench.bytes_per_step:
        row["gb_s"] = bench.bytes_per_step / (row["median_ms"] * 1e-3) / 1e9
    if bench.flops_per_step:
        row["tflop_s"] = bench.flops_per_step / (row["median_ms"] * 1e-3) / 1e12
    if bench.tokens_per_step:
        row["tokens_s"] = bench.tokens_per_step / (row["median_ms"] * 1e-3)
    del state
    gc.collect()
    return row, outs


def interleaved(bench: Benchmark, rounds: int, out_dir: Optional[Path] = None) -> list:
    """Round-robin timing in ONE process, for a CPU shared with other jobs: every round runs one step
    of each provider, so a load spike hits all of them alike, and each ratio is the median over rounds
    of (this provider's step / the baseline's step in the SAME round). Outputs are checked against the
    reference first (check_agreement). No memory figures (one process). The providers share the process's
    allocator (freed large buffers go back to the OS, so a provider whose step is short pays page faults
    that a fresh process would not) and caches; quote it beside the fresh-process run. Returns rows
    {provider, min_ms, median_ms, "time / <baseline>": ratio}; with ``out_dir`` also writes
    <op>_<device>_interleaved.{json,md}."""
    check_agreement(bench)
    live = [p for p in bench.providers if p.is_available()[0]]
    states = {p.name: p.setup() for p in live}
    # two untimed rounds: the first call (compile, JIT) and one warmup
    times = interleave({p.name: (lambda _, p=p: p.step(states[p.name])) for p in live}, rounds, warmup_rounds=2,
                       sync_device=lambda: sync(bench.device))
    bases = [b for b in bench.baselines if b in times]
    rows = []
    for p in live:
        row = {"provider": p.name, "min_ms": min(times[p.name]), "median_ms": quantile(times[p.name], 0.5)}
        for b in bases:
            row[f"time / {b}"] = quantile([t / u for t, u in zip(times[p.name], times[b])], 0.5)
        rows.append(row)
    meta = metadata(bench, Options(warmup=1, repeats=rounds, max_time_s=0.0, timeout_s=0.0, memory=False,
                                   inprocess=True))
    lines = [f"{bench.op} on {bench.device}: {bench.description}; {rounds} interleaved rounds in one process",
             "", f"{meta['date']}, git {meta['git']}, torch {meta['torch']}, {meta['torch_threads']} threads, load "
             f"average at start {meta['load_avg_at_start']}.",
             "", "| provider | min ms | median ms |" + "".join(f" time / {b} (per-round median) |" for b in bases),
             "|---|---|---|" + "---|" * len(bases),
             "| *(column meaning)* | *fastest step* | *time per step* |"
             + "".join(f" *median over rounds of this step / {b}'s step (<1 faster)* |" for b in bases)]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['min_ms']:.2f} | {r['median_ms']:.2f} |"
                     + "".join(f" {r[f'time / {b}']:.3f} |" for b in bases))
    text = "\n".join(lines)
    print(text, flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{bench.op}_{bench.device}_interleaved"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rounds": rounds, "rows": rows,
                                                         "times_ms": times}, indent=1))
        stem.with_suffix(".md").write_text(text + "\n")
        print(f"\nwrote {stem}.json, {stem}.md")
    return rows


def child_main(spec_json: str) -> int:
    import importlib

    import torch

    spec = json.loads(spec_json)
    module = importlib.import_module(spec["module"])
    bench = module.build(spec["config"])
    provider = next(p for p in bench.providers if p.name == spec["provider"])
    ref = torch.load(spec["ref_path"]) if spec.get("ref_path") else None
    row, outs = run_provider(bench, provider, Options(**spec["options"]), ref)
    if spec.get("save_path"):
        torch.save(outs, spec["save_path"])
    sys.stdout.flush()
    print(_MARK + json.dumps(row), flush=True)
    return 0


def _run_child(module_name: str, bench: Benchmark, provider: Provider, opts: Options, ref_path, save_path) -> dict:
    spec = {
        "module": module_name,
        "config": bench.config,
        "provider": provider.name,
        "options": dataclasses.asdict(opts),
        "ref_path": str(ref_path) if ref_path else None,
        "save_path": str(save_path) if save_path else None,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "benchmarks.harness", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=opts.timeout_s)
    except subprocess.TimeoutExpired:
        return {"provider": provider.name, "status": "error", "reason": f"timed out after {opts.timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-3:]
    return {"provider": provider.name, "status": "error", "reason": f"exit {proc.returncode}: " + " / ".join(tail)}


def run(bench: Benchmark, opts: Options, module_name: str) -> list:
    """Every provider of ``bench``, the reference first (its outputs check the others). Rows come
    back in declared order, with ratio columns filled."""
    rows: dict = {}
    ref_outs = None
    by_name = {p.name: p for p in bench.providers}
    order = [by_name[bench.reference]] + [p for p in bench.providers if p.name != bench.reference] \
        if bench.reference in by_name else list(bench.providers)
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as tmp:
        ref_path = Path(tmp) / "reference.pt"
        for p in order:
            ok, why = p.is_available()
            if not ok:
                rows[p.name] = {"provider": p.name, "status": "unavailable", "reason": why}
                print(f"  {p.name:<18} unavailable: {why}", flush=True)
                continue
            is_ref = p.name == bench.reference
            print(f"  {p.name:<18} running ...", flush=True)
            started = time.perf_counter()
            try:
                if opts.inprocess:
                    row, outs = run_provider(bench, p, opts, None if is_ref else ref_outs)
                    if is_ref:
                        ref_outs = outs
                    del outs
                else:
                    row = _run_child(module_name, bench, p, opts,
                                     None if is_ref or not ref_path.exists() else ref_path,
                                     ref_path if is_ref else None)
            except Exception as exc:  # in-process: a crashing provider is a row, not the end of the run
                row = {"provider": p.name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            row["wall_s"] = time.perf_counter() - started  # whole provider, process start included
            if not is_ref and "max_diff" not in row and row["status"] == "ok":
                row["reason"] = f"unchecked: reference {bench.reference} produced no outputs"
            rows[p.name] = row
            done = f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
            print(f"  {p.name:<18} {done}", flush=True)
    ordered = [rows[p.name] for p in bench.providers]
    for base in bench.baselines:
        b = rows.get(base, {})
        for r in ordered:
            if r["status"] == "ok" and b.get("status") == "ok":
                r[f"vs {base}"] = b["median_ms"] / r["median_ms"]
    return ordered
