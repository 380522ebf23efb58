"""Shared benchmark harness: every provider of one op side by side, in one run.

A benchmark module ``benchmarks/bench_<op>.py`` defines

    add_arguments(parser)            its own options (shapes, dtype, ...)
    config_from_args(args, device)   -> a JSON-serialisable dict (``device`` and ``quick`` included)
    build(config) -> Benchmark       the providers and the work per step for that config

and ends with ``if __name__ == "__main__": sys.exit(harness.main(sys.modules[__name__]))``.
``build`` must be deterministic in ``config``: each provider is re-built from it in a fresh
subprocess.

Per provider (in a FRESH subprocess unless ``--inprocess``: one provider's allocations, threads and
caches cannot colour another's numbers, and its peak memory is its own):
  1. ``setup()`` builds the inputs; the first ``step()`` is timed alone ("1st call": it holds
     torch.compile / Triton JIT / autotuning, which are excluded from the timed steps).
  2. Its outputs (a sample of rows of each) are checked against the ``reference`` provider's. One
     that disagrees is reported MISMATCH and never timed, so a broken kernel cannot win.
  3. ``warmup`` steps, then ``repeats`` timed steps reported as median / p20 / p80 ms, then the
     peak memory over ``mem_steps`` more steps. CUDA: CUDA events around each step, an L2 flush before
     each (as triton.testing.do_bench does); CPU: time.perf_counter.
Ratios are ``baseline median / provider median`` (> 1: faster than the baseline), measured in the
same run on the same inputs. ``--interleave ROUNDS`` instead runs every provider in one process, one
step each per round, and reports per-round paired ``provider / baseline`` time ratios (see interleaved()):
the measurement to quote on a CPU shared with other jobs.

Results: ``<out-dir>/<op>_<device>[_<tag>].{csv,json,md,png}``. The default ``--out-dir`` is
benchmarks/out/ (ignored by git), so a run never touches the committed reference results in
benchmarks/results/; those are rewritten only on purpose (``make bench-save``, i.e.
``--out-dir benchmarks/results``), from a quiet machine.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"  # generated results (git-ignored)
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed reference results (make bench-save)
# A provider subprocess's cost beyond its steps (interpreter, torch and fastft imports, setup): used only
# to estimate a run's duration from reference results that predate the per-provider wall time.
_PROCESS_OVERHEAD_S = 5.0
_MARK = "@@FASTFT_BENCH_RESULT@@"


@dataclass
class Provider:
    """One implementation of the op. ``setup() -> state``; ``step(state)`` is the timed unit of work
    and returns what is compared across providers (a tensor, or a dict/tuple of tensors). A step
    must leave ``state`` as it found it (e.g. set ``.grad = None`` after reading it) so memory and
    time do not drift between steps. ``check_step(state)``, when given, is what the outputs are compared
    with instead of ``step``: the same work made deterministic (dropout off), for a step that draws random
    masks which differ between providers."""

    name: str
    setup: Callable[[], Any]
    step: Callable[[Any], Any]
    available: Optional[Callable[[], tuple[bool, str]]] = None
    check_step: Optional[Callable[[Any], Any]] = None

    def checked_outputs(self, state, out=None) -> dict:
        """Sampled outputs to compare: of ``check_step``, else of ``out`` (a step's result) or a new step."""
        if self.check_step is not None:
            out = self.check_step(state)
        elif out is None:
            out = self.step(state)
        return {k: _sample(v) for k, v in _outputs(out).items()}

    def is_available(self) -> tuple[bool, str]:
        if self.available is None:
            return True, ""
        try:
            ok, why = self.available()
            return bool(ok), str(why)
        except Exception as exc:  # a probe that raises means "not usable here", with why
            return False, f"{type(exc).__name__}: {exc}"


def unavailable(name: str, reason: str) -> Provider:
    """A provider listed in the table as unavailable, with the reason."""

    def _never(*_):
        raise RuntimeError(reason)

    return Provider(name, _never, _never, lambda: (False, reason))


def liger_provider(device: str, attr: str, setup: Callable, step: Callable, note: str = "") -> Provider:
    """Liger-Kernel's ``liger_kernel.transformers.<attr>`` (a loss class, the functional module, or a
    model patcher such as ``apply_liger_kernel_to_llama``) as a peer, on CUDA only (its Triton kernels
    under the CPU interpreter are no speed peer). ``setup(obj)`` builds the state from it; ``step(state)``
    runs it as Liger documents."""
    if device != "cuda":
        return unavailable("liger", "Liger-Kernel: CUDA only - its Triton kernels under the CPU interpreter are "
                           "no speed peer")

    def load():
        import liger_kernel.transformers as lt

        return getattr(lt, attr)

    def available():
        import liger_kernel

        load()
        version = getattr(liger_kernel, "__version__", "")
        return True, " ".join(part for part in ("liger_kernel", version, attr, note) if part)

    return Provider("liger", lambda: setup(load()), step, available)


def fastft_backend_provider(device: str, backend: str, setup: Callable, step: Callable, available: Callable,
                            check_step: Optional[Callable] = None) -> Provider:
    """fastft on one of its backends ("cpp" or "triton") as the provider ``fastft-<backend>``: ``step`` (and
    ``check_step``) run under ``fastft.backend.use(backend)``. Listed as unavailable, with why, where that backend
    is no speed peer: Triton on CPU (the interpreter), the C++ backend on CUDA, the CUDA extension on CPU. Shared so that a bench_<op>.py
    states only its inputs and its step, not this wrapping and these rules again."""
    name = f"fastft-{backend}"
    if backend == "triton" and device == "cpu":
        return unavailable(name, "Triton on CPU runs only under the interpreter: correct, but no speed peer")
    if backend == "cpp" and device != "cpu":
        return unavailable(name, "C++ backend takes CPU tensors only")
    if backend == "cuda" and device != "cuda":
        return unavailable(name, "CUDA only")
    import fastft.backend

    def on_backend(fn):
        def run_on_backend(state):
            with fastft.backend.use(backend):
                return fn(state)

        return run_on_backend

    return Provider(name, setup, on_backend(step), available,
                    check_step=None if check_step is None else on_backend(check_step))


@dataclass
class Benchmark:
    op: str
    device: str
    config: dict
    providers: list[Provider]
    description: str  # the shape and what one step is, for titles
    reference: str  # every provider's outputs are checked against this one's
    baselines: tuple[str, ...] = ()  # one "vs <name>" ratio column each
    bytes_per_step: Optional[int] = None  # explicit byte count -> GB/s
    flops_per_step: Optional[int] = None  # explicit flop count -> TFLOP/s
    tokens_per_step: Optional[int] = None  # tokens a training step processes -> tokens/s
    # output name (or "*") -> (atol, rtol); pass when max|out - ref| <= atol + rtol * max|ref|
    tolerances: dict = field(default_factory=lambda: {"*": (1e-5, 1e-4)})
    notes: list = field(default_factory=list)
    # how the compared outputs differ from the timed step's, e.g. "dropout off" (see Provider.check_step)
    check_note: str = ""


@dataclass
class Options:
    warmup: int = 3
    repeats: int = 15
    mem_steps: int = 2
    max_time_s: float = 60.0  # stop timing a provider after this long (at least 3 repeats)
    timeout_s: float = 900.0  # per provider subprocess
    memory: bool = True
    inprocess: bool = False


# ------------------------------------------------------------------------------------------------
# Measuring one provider (runs inside the provider's subprocess, or in-process)
# ------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _outputs(out) -> dict:
    import torch

    if out is None:
        return {}
    if isinstance(out, torch.Tensor):
        return {"out": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"out{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise TypeError(f"a step must return a tensor, or a dict/tuple of tensors; got {type(out).__name__}")


def _sample(t, max_elems: int = 1 << 22):
    """The tensor, or evenly spaced rows of it when it is big (a [8192, 128256] gradient is checked
    on ~32 full rows): enough to catch a broken kernel, cheap to keep and ship between processes."""
    import torch

    t = t.detach()
    if t.dim() >= 2 and t.numel() > max_elems:
        rows = t.reshape(-1, t.shape[-1])
        k = max(1, max_elems // rows.shape[1])
        idx = torch.linspace(0, rows.shape[0] - 1, k, device=t.device).round().long()
        t = rows[idx]
    return t.float().cpu()


def compare(outs: dict, ref: dict, tolerances: dict) -> tuple[bool, dict, str]:
    """Max abs difference per output; ok when each is within atol + rtol * max|ref| (NaN where
    the reference has none fails)."""
    import torch

    diffs, bad = {}, []
    for name, r in ref.items():
        o = outs.get(name)
        if o is None or tuple(o.shape) != tuple(r.shape):
            bad.append(f"{name}: shape {None if o is None else tuple(o.shape)} != reference {tuple(r.shape)}")
            diffs[name] = float("inf")
            continue
        d = (o - r).abs()
        d = torch.where(torch.isnan(o) & torch.isnan(r), torch.zeros_like(d), d)
        d = torch.nan_to_num(d, nan=float("inf"))
        diff = float(d.max()) if d.numel() else 0.0
        atol, rtol = tolerances.get(name, tolerances.get("*", (1e-5, 1e-4)))
        limit = atol + rtol * (float(r.abs().nan_to_num(0.0).max()) if r.numel() else 0.0)
        diffs[name] = diff
        if not diff <= limit:
            bad.append(f"{name}: max |diff| {diff:.3g} > tolerance {limit:.3g}")
    return not bad, diffs, "; ".join(bad)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _rss_mb() -> float:
    """Resident memory, after handing glibc's free heap pages back (malloc_trim) so that memory
    freed earlier does not count as held."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    return _status_kb("VmRSS") / 1024.0


def _mem_now_mb(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    return _rss_mb()


def _reset_peak_rss() -> bool:
    # Writing "5" to clear_refs resets the kernel's RSS high-water mark (VmHWM, also ru_maxrss) to
    # the current RSS (Linux >= 4.0). The kernel updates the mark before it unmaps pages, so even a
    # temporary freed within the step is counted: exact, where a sampler thread only sees the RSS at
    # its polls and misses short peaks. Checked: a 524 MB temporary freed at once shows in VmHWM.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _pin_malloc() -> bool:
    # torch's CPU allocator does not cache; glibc does. After a big block is freed, glibc raises its
    # mmap threshold (up to 32 MB) and serves blocks under it from the heap, whose freed pages stay
    # resident: the RSS after warmup then already holds a step's temporaries, and the peak over it
    # reads ~0 (seen: torch.compile at N=1024, V=8192). So fix the threshold at 128 KB (mallopt
    # M_MMAP_THRESHOLD, which also ends the adaptation: big blocks are mmapped and unmapped on free);
    # _rss_mb hands free heap pages back before the baseline. Called after the timing: an mmap per
    # block adds page faults the timed steps should not pay.
    libc = _libc()
    M_MMAP_THRESHOLD = -3
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))


def _cpu_peak(step, state, n: int) -> tuple[float, float, str]:
    """(baseline RSS MB, peak RSS growth MB over ``n`` steps, method). The baseline is the RSS
    between steps, warmed up. Counts the pages a step touches (its outputs and temporaries are all
    written)."""
    gc.collect()
    if not _pin_malloc():
        print("harness: could not pin glibc malloc; peak memory may read low", file=sys.stderr)
    base = _rss_mb()
    if _reset_peak_rss():
        for _ in range(n):
            step(state)
        return base, _status_kb("VmHWM") / 1024.0 - base, "VmHWM"
    # Fallback (no clear_refs, e.g. some sandboxes): poll RSS from a thread every 0.5 ms. ATen ops
    # and the autograd engine release the GIL, so the poller runs during the step, but a peak shorter
    # than a poll can be missed: a lower bound.
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _status_kb("VmRSS") / 1024.0)
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        for _ in range(n):
            step(state)
    finally:
        done.set()
        thread.join()
    return base, peak[0] - base, "RSS sampler (lower bound)"


def _cuda_peak(step, state, n: int) -> tuple[float, float, str]:
    import torch

    gc.collect()
    base = _mem_now_mb("cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(n):
        step(state)
    torch.cuda.synchronize()
    return base, torch.cuda.max_memory_allocated() / 2**20 - base, "cuda max_memory_allocated"


def _time_steps(step, state, device: str, repeats: int, max_time_s: float) -> list[float]:
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


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_provider(bench: Benchmark, provider: Provider, opts: Options, ref: Optional[dict]) -> tuple[dict, dict]:
    """Set up, check against ``ref`` (sampled reference outputs; None: this is the reference),
    warm up, measure memory, time. Returns (result row, sampled outputs)."""
    row: dict = {"provider": provider.name, "status": "ok", "reason": ""}
    device = bench.device
    measure_mem = opts.memory and opts.mem_steps > 0 and (device == "cuda" or not opts.inprocess)
    state = provider.setup()
    _sync(device)
    mem_inputs = _mem_now_mb(device) if measure_mem else 0.0  # inputs built, nothing run yet
    t0 = time.perf_counter()
    out = provider.step(state)
    _sync(device)
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
    _sync(device)
    times = _time_steps(provider.step, state, device, opts.repeats, opts.max_time_s)
    # After the timing (see _pin_malloc). On CPU only in a fresh process: pinning malloc there would
    # change the timing of the providers run after this one.
    # peak_extra_mb: a step's peak above the memory between steps; held_mb: what the provider keeps
    # between steps beyond its inputs (buffer caches; on CPU also compiled code and the like).
    if measure_mem:
        base, row["peak_extra_mb"], row["memory_method"] = (_cuda_peak if device == "cuda" else _cpu_peak)(
            provider.step, state, opts.mem_steps)
        row["held_mb"] = base - mem_inputs
    row.update(
        repeats=len(times),
        median_ms=_quantile(times, 0.5),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
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


def check_agreement(bench: Benchmark, names: Optional[list] = None) -> dict:
    """One step of each available provider (in-process, nothing timed), compared with the
    reference. Returns {provider: {output: max diff}}; raises AssertionError on any disagreement.
    For tests."""
    providers = {p.name: p for p in bench.providers}
    ref_provider = providers[bench.reference]
    ref = ref_provider.checked_outputs(ref_provider.setup())
    result, failures = {}, []
    for p in bench.providers:
        if (names is not None and p.name not in names) or p.name == bench.reference or not p.is_available()[0]:
            continue
        outs = p.checked_outputs(p.setup())
        ok, diffs, why = compare(outs, ref, bench.tolerances)
        result[p.name] = diffs
        if not ok:
            failures.append(f"{p.name}: {why}")
    assert not failures, "providers disagree with " + bench.reference + ": " + " | ".join(failures)
    return result


def interleaved(bench: Benchmark, rounds: int, out_dir: Optional[Path] = None) -> list:
    """Round-robin timing in ONE process, for a CPU shared with other jobs: every round runs one step
    of each provider, so a load spike hits all of them alike, and each ratio is the median over rounds
    of (this provider's step / the baseline's step in the SAME round). Outputs are checked against the
    reference first (check_agreement). No memory figures (one process). The providers share the process's
    allocator (freed large buffers go back to the OS, so a provider whose step is short pays page faults
    that a fresh process would not) and caches; quote it beside the fresh-process run. Returns rows
    {provider, min_ms, median_ms, "time / <baseline>": ratio}; with ``out_dir`` also writes
    <op>_<device>_interleaved.{json,md}."""
    import time

    check_agreement(bench)
    live = [p for p in bench.providers if p.is_available()[0]]
    states = {p.name: p.setup() for p in live}
    for p in live:  # the first call (compile, JIT) and one warmup
        p.step(states[p.name])
        p.step(states[p.name])
    times = {p.name: [] for p in live}
    for _ in range(rounds):
        for p in live:
            _sync(bench.device)
            t0 = time.perf_counter()
            p.step(states[p.name])
            _sync(bench.device)
            times[p.name].append((time.perf_counter() - t0) * 1e3)
    bases = [b for b in bench.baselines if b in times]
    rows = []
    for p in live:
        row = {"provider": p.name, "min_ms": min(times[p.name]), "median_ms": _quantile(times[p.name], 0.5)}
        for b in bases:
            row[f"time / {b}"] = _quantile([t / u for t, u in zip(times[p.name], times[b])], 0.5)
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


# ------------------------------------------------------------------------------------------------
# Orchestration: one subprocess per provider
# ------------------------------------------------------------------------------------------------


def _child(spec_json: str) -> int:
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


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# What each column means, printed as the table's first row (the table explains itself wherever it is
# pasted; the .md's paragraph above it says the same at length).
_COLUMN_MEANINGS = {
    "provider": "(column meaning)",
    "median ms": "time per step",
    "p20 ms": "20th percentile",
    "p80 ms": "80th percentile",
    "GB/s": "bytes / median",
    "TFLOP/s": "flops / median",
    "tokens/s": "tokens / median",
    "peak extra MB": "step peak above between-steps",
    "held MB": "kept between steps, beyond inputs",
    "1st call s": "first step alone (compile/JIT)",
}


def _meaning(column: str, bench: Benchmark) -> str:
    if column in _COLUMN_MEANINGS:
        return _COLUMN_MEANINGS[column]
    if column.startswith("max diff vs "):
        return "max abs diff, checked outputs" + (" (" + bench.check_note + ")" if bench.check_note else "")
    if column.startswith("vs "):
        return f"{column[3:]} median / this (>1 faster)"
    return ""


def table(bench: Benchmark, rows: list) -> str:
    """Markdown table (aligned, so it reads on a terminal too): a row saying what each column means,
    one row per provider, then one line per provider not run."""
    head = ["provider", "median ms", "p20 ms", "p80 ms"]
    head += ["GB/s"] if bench.bytes_per_step else []
    head += ["TFLOP/s"] if bench.flops_per_step else []
    head += ["tokens/s"] if bench.tokens_per_step else []
    head += ["peak extra MB", "held MB", "1st call s", "max diff vs " + bench.reference] + [f"vs {b}" for b in bench.baselines]
    body, notes = [[f"*{_meaning(c, bench)}*" for c in head]], []
    for r in rows:
        diff_text = ", ".join(f"{k} {v:.1e}" for k, v in (r.get("max_diff") or {}).items())
        if r["status"] != "ok":
            cells = [r["provider"], r["status"].upper()] + [""] * (len(head) - 2)
            cells[head.index("max diff vs " + bench.reference)] = diff_text
            body.append(cells)
            notes.append(f"- {r['provider']}: {r['status']} - {r['reason']}")
            continue
        line = [r["provider"], _fmt(r["median_ms"], ".3f"), _fmt(r["p20_ms"], ".3f"), _fmt(r["p80_ms"], ".3f")]
        line += [_fmt(r.get("gb_s"), ".1f")] if bench.bytes_per_step else []
        line += [_fmt(r.get("tflop_s"), ".1f")] if bench.flops_per_step else []
        line += [_fmt(r.get("tokens_s"), ".0f")] if bench.tokens_per_step else []
        line += [
            _fmt(r.get("peak_extra_mb"), ".0f"),
            _fmt(r.get("held_mb"), ".0f"),
            _fmt(r.get("first_call_s"), ".2f"),
            "(reference)" if r["provider"] == bench.reference else diff_text or "-",
        ]
        line += [_fmt(r.get(f"vs {b}"), ".2f") + ("x" if r.get(f"vs {b}") is not None else "") for b in bench.baselines]
        body.append(line)
        if r.get("reason"):
            notes.append(f"- {r['provider']}: {r['reason']}")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt_row = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [fmt_row(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt_row(b) for b in body]
    return "\n".join(lines + ([""] + notes if notes else []))


def _git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def metadata(bench: Benchmark, opts: Options) -> dict:
    import torch

    meta = {
        "op": bench.op,
        "device": bench.device,
        "description": bench.description,
        "config": bench.config,
        "bytes_per_step": bench.bytes_per_step,
        "flops_per_step": bench.flops_per_step,
        "reference": bench.reference,
        "baselines": list(bench.baselines),
        "options": dataclasses.asdict(opts),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": _git_rev(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "notes": list(bench.notes),
        "check_note": bench.check_note,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        meta["cpu"] = platform.processor()
    if bench.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
    return meta


def save(bench: Benchmark, rows: list, meta: dict, out_dir: Path, tag: str = "") -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{bench.op}_{bench.device}{'_' + tag if tag else ''}"
    paths = []
    keys = ["provider", "status", "median_ms", "p20_ms", "p80_ms", "repeats", "gb_s", "tflop_s", "tokens_s", "peak_extra_mb",
            "held_mb", "memory_method", "first_call_s", "wall_s", "max_diff"]
    keys += [f"vs {b}" for b in bench.baselines] + ["reason"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "max_diff": json.dumps(r.get("max_diff")) if r.get("max_diff") else ""})
    paths.append(stem.with_suffix(".csv"))
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    paths.append(stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(markdown(bench, rows, meta))
    paths.append(stem.with_suffix(".md"))
    png = plot(bench, rows, meta, stem.with_suffix(".png"))
    if png is not None:
        paths.append(png)
    return paths


def markdown(bench: Benchmark, rows: list, meta: dict) -> str:
    """The .md report: what was measured, how, on what, the table, the benchmark's notes."""
    where = meta.get("gpu") or meta.get("cpu")
    md = [
        f"# {bench.op} on {bench.device} ({where})",
        "",
        f"{bench.description}. {meta['date']}, git {meta['git']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['torch_threads']} threads, load average at start {meta['load_avg_at_start']}.",
        f"Median / p20 / p80 of {meta['options']['repeats']} steps after {meta['options']['warmup']} warmup steps; "
        "each provider in a fresh process" + (" (in-process run)" if meta["options"]["inprocess"] else "") + ". "
        "`vs X` = X's median / this median (> 1: faster than X). `1st call s` is the first step alone "
        "(torch.compile / JIT time), excluded from the timed steps. Peak extra MB: a step's peak memory above the memory "
        "between steps; held MB: memory kept between steps beyond the inputs (buffer caches; on CPU also "
        "code and libraries the first step loads: compare with torch-eager's). "
        "CPU: RSS (kernel high-water mark); CUDA: torch.cuda allocated bytes. "
        "`max diff`: largest absolute difference of sampled outputs from the reference's"
        + (f" ({bench.check_note})" if bench.check_note else "") + ". The table's first row repeats what each "
        "column means.",
        "",
        table(bench, rows),
    ]
    md += [""] + [f"- {n}" for n in bench.notes] if bench.notes else []
    return "\n".join(md) + "\n"


def machine_line(meta: dict) -> str:
    """Where and with what a run was measured, for a plot's footer."""
    where = meta.get("gpu") or meta.get("cpu") or meta.get("device", "")
    parts = [where, f"{meta.get('torch_threads')} threads" if meta.get("device") == "cpu" else f"CUDA {meta.get('cuda')}",
             f"torch {meta.get('torch')}", f"triton {meta.get('triton')}", f"python {meta.get('python')}",
             f"git {meta.get('git')}", str(meta.get("date", ""))[:16]]
    return ", ".join(str(p) for p in parts if p)


def plot(bench: Benchmark, rows: list, meta: dict, path: Path):
    """Time per step (left) and peak memory (right, held + step peak) per provider, one figure; the
    title wraps to the figure's width, the machine and versions are in its footer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written", file=sys.stderr)
        return None
    import textwrap

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    names = [r["provider"] for r in ok]
    colors = ["tab:green" if n.startswith("fastft") else "tab:gray" for n in names]
    width_in = 12.0
    chars_per_line = int(width_in * 11)  # ~11 characters per inch at the 9-pt title font
    title = textwrap.fill(f"{bench.op}: {bench.description}", chars_per_line)
    footer = textwrap.fill(machine_line(meta), int(width_in * 13))
    extra_lines = title.count("\n") + footer.count("\n")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(width_in, 0.5 * len(ok) + 2.2 + 0.18 * extra_lines),
                                     sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    med = [r["median_ms"] for r in ok]
    err = [[r["median_ms"] - r["p20_ms"] for r in ok], [r["p80_ms"] - r["median_ms"] for r in ok]]
    ax_t.barh(names, med, xerr=err, color=colors, capsize=3)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("ms per step (median; whiskers p20-p80)")
    base = bench.baselines[0] if bench.baselines else None
    for i, r in enumerate(ok):
        label = f" {r['median_ms']:.2f} ms"
        if base and r.get(f"vs {base}") is not None:
            label += f" ({r[f'vs {base}']:.2f}x vs {base})"
        ax_t.text(r["p80_ms"], i, label, va="center", fontsize=8)
    ax_t.set_xlim(0, max(r["p80_ms"] for r in ok) * 1.7)
    ax_t.set_title("time", fontsize=9)

    held = [max(r.get("held_mb") or 0.0, 0.0) for r in ok]
    peak = [max(r.get("peak_extra_mb") or 0.0, 0.0) for r in ok]
    if any(r.get("peak_extra_mb") is not None for r in ok):
        ax_m.barh(names, held, color=colors, alpha=0.45)
        ax_m.barh(names, peak, left=held, color=colors)
        for i, (h, e) in enumerate(zip(held, peak)):
            ax_m.text(h + e, i, f" {h + e:.0f} MB ({h:.0f} held + {e:.0f} step)", va="center", fontsize=8)
        ax_m.set_xlim(0, max(max(h + e for h, e in zip(held, peak)), 1.0) * 1.8)
        method = "RSS" if meta.get("device") == "cpu" else "torch.cuda allocated"
        ax_m.set_xlabel(f"MB above the inputs at a step's peak ({method}):\n"
                        "held between steps (light) + the step's own peak (dark)")
    else:
        ax_m.text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=ax_m.transAxes)
        ax_m.set_xticks([])
    ax_m.set_title("peak memory", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.text(0.01, 0.005, footer, fontsize=7, color="dimgray", va="bottom")
    fig.tight_layout(rect=(0, 0.035 + 0.02 * footer.count("\n"), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def redraw(results_dir: Path) -> list:
    """Rewrite every ``<stem>.md`` and ``<stem>.png`` from its ``<stem>.json``: the same numbers and
    metadata in the current report layout (no benchmark is run)."""
    paths = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if "results" not in data:  # interleaved runs have no plot
            continue
        meta = data["meta"]
        shell = Benchmark(op=meta["op"], device=meta["device"], config=meta["config"], providers=[],
                          description=meta["description"], reference=meta["reference"],
                          baselines=tuple(meta["baselines"]), bytes_per_step=meta.get("bytes_per_step"),
                          flops_per_step=meta.get("flops_per_step"), notes=list(meta.get("notes", [])),
                          check_note=meta.get("check_note", ""))
        path.with_suffix(".md").write_text(markdown(shell, data["results"], meta))
        paths.append(path.with_suffix(".md"))
        png = plot(shell, data["results"], meta, path.with_suffix(".png"))
        if png is not None:
            paths.append(png)
    return paths


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
            total += _PROCESS_OVERHEAD_S + r.get("first_call_s", 0.0) + steps * r.get("median_ms", 0.0) / 1e3
    return total


def expected_duration_text(device: str, results_dir: Path = RESULTS_DIR) -> str:
    """One line for the start of `make bench`: its expected duration from the reference results."""
    per_op = {}
    for path in sorted(results_dir.glob(f"*_{device}.json")):
        op = path.name[: -len(f"_{device}.json")]
        seconds = reference_seconds(op, device, results_dir)
        if seconds is not None:
            per_op[op] = seconds
    if not per_op:
        return f"expected duration: unknown (no reference results for {device} in {results_dir})"
    parts = ", ".join(f"{op} {s / 60:.1f}" for op, s in per_op.items())
    return (f"expected duration: about {sum(per_op.values()) / 60:.0f} min on {device} ({parts} min, from the "
            f"reference runs in {results_dir.relative_to(ROOT) if results_dir.is_relative_to(ROOT) else results_dir}; "
            "ops without one come on top)")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parser_for(module) -> argparse.ArgumentParser:
    doc = (module.__doc__ or "").strip()
    p = argparse.ArgumentParser(
        prog=f"python -m {module.__spec__.name}", description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("harness")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when torch sees a GPU")
    g.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run; files tagged 'quick')")
    g.add_argument("--warmup", type=int, help="warmup steps after the first call (default: 3 CPU, 10 CUDA, 1 quick)")
    g.add_argument("--repeats", type=int, help="timed steps (default: 15 CPU, 50 CUDA, 5 quick)")
    g.add_argument("--max-time", type=float, default=60.0, help="stop timing a provider after this many seconds")
    g.add_argument("--providers", help="comma-separated provider names to run (default: all)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    g.add_argument("--inprocess", action="store_true", help="run providers in this process (debugging; no CPU memory figures)")
    g.add_argument("--timeout", type=float, default=900.0, help="seconds per provider subprocess")
    g.add_argument("--out-dir", type=Path, default=OUT_DIR,
                   help="where result files go (benchmarks/results holds the committed reference results: "
                        "write there only on purpose, e.g. make bench-save)")
    g.add_argument("--tag", default=None, help="suffix for result file names (default: 'quick' with --quick)")
    g.add_argument("--no-save", action="store_true", help="print only")
    g.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="instead of one subprocess per provider: all providers in this process, one step each per "
                        "round for ROUNDS rounds, ratios paired per round (robust to a CPU shared with other jobs)")
    module.add_arguments(p)
    return p


def main(module, argv: Optional[list] = None) -> int:
    """CLI entry of ``bench_<op>.py``: 0 when every provider that ran agreed with the reference."""
    args = parser_for(module).parse_args(argv)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU", file=sys.stderr)
        return 2
    gpu = device == "cuda"
    opts = Options(
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 10 if gpu else 3),
        repeats=args.repeats if args.repeats is not None else (5 if args.quick else 50 if gpu else 15),
        max_time_s=args.max_time,
        timeout_s=args.timeout,
        memory=not args.no_memory,
        inprocess=args.inprocess,
    )
    bench = module.build(module.config_from_args(args, device))
    if args.providers:
        wanted = [s.strip() for s in args.providers.split(",") if s.strip()]
        unknown = set(wanted) - {p.name for p in bench.providers}
        if unknown:
            print(f"unknown providers {sorted(unknown)}; have {[p.name for p in bench.providers]}", file=sys.stderr)
            return 2
        bench.providers = [p for p in bench.providers if p.name in wanted or p.name == bench.reference]
    if args.interleave:
        interleaved(bench, args.interleave, None if args.no_save else args.out_dir)
        return 0
    meta = metadata(bench, opts)
    print(f"{bench.op} on {device} ({meta.get('gpu') or meta.get('cpu')}): {bench.description}", flush=True)
    expected = reference_seconds(bench.op, device) if not args.quick else None
    if expected is not None:
        print(f"expected duration: about {expected:.0f} s (reference run in benchmarks/results)", flush=True)
    rows = run(bench, opts, module.__spec__.name)
    print()
    print(table(bench, rows))
    if not args.no_save:
        tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
        paths = save(bench, rows, meta, args.out_dir, tag)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 1 if any(r["status"] in ("mismatch", "error") for r in rows) else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "--redraw":
        print("wrote " + ", ".join(str(p) for p in redraw(Path(sys.argv[2]))))
        sys.exit(0)
    if len(sys.argv) >= 2 and sys.argv[1] == "--expected-duration":  # `make bench` prints this first
        if len(sys.argv) > 2:
            device_arg = sys.argv[2]
        else:
            import torch

            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        print(expected_duration_text(device_arg))
        sys.exit(0)
    print("usage: python -m benchmarks.bench_<op> ... (benchmarks.harness is the shared library; it also takes "
          "--expected-duration [cpu|cuda] and --redraw DIR)", file=sys.stderr)
    sys.exit(2)
