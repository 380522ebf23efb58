"""Reports: the aligned markdown table, the .md / .csv / .json / .png files, run metadata, and redrawing
committed results in the current layout."""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .paths import ROOT
from .providers import Benchmark, Options


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
        "tokens_per_step": bench.tokens_per_step,
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


def loss_time_memory_table(losses: dict, times_ms: dict, peak_bytes: dict, baseline: str) -> list:
    """Markdown rows of a one-off comparison (provider -> loss tensor, ms per round, counted peak bytes): the loss,
    the median ms, the peak MiB and both ratios to ``baseline``'s, measured in the same run."""
    import statistics

    base_ms = statistics.median(times_ms[baseline])
    lines = [f"| provider | loss | ms (median) | peak MiB (counted) | time / {baseline} | memory / {baseline} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in losses:
        ms = statistics.median(times_ms[name])
        lines.append(f"| {name} | {float(losses[name]):.6f} | {ms:.0f} | {peak_bytes[name] / 2**20:.0f} | "
                     f"{ms / base_ms:.2f} | {peak_bytes[name] / peak_bytes[baseline]:.2f} |")
    return lines


def emit_text_report(lines: list, out=None) -> str:
    """A one-off benchmark's report (markdown lines): printed, and written to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        Path(out).write_text(text)
    return text


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
        tokens = meta.get("tokens_per_step")
        if tokens is None:  # results written before the metadata kept it: the rows' tokens/s say it
            tokens = next((round(r["tokens_s"] * r["median_ms"] * 1e-3) for r in data["results"] if r.get("tokens_s")),
                          None)
        shell = Benchmark(op=meta["op"], device=meta["device"], config=meta["config"], providers=[],
                          description=meta["description"], reference=meta["reference"],
                          baselines=tuple(meta["baselines"]), bytes_per_step=meta.get("bytes_per_step"),
                          flops_per_step=meta.get("flops_per_step"), tokens_per_step=tokens, notes=list(meta.get("notes", [])),
                          check_note=meta.get("check_note", ""))
        path.with_suffix(".md").write_text(markdown(shell, data["results"], meta))
        paths.append(path.with_suffix(".md"))
        png = plot(shell, data["results"], meta, path.with_suffix(".png"))
        if png is not None:
            paths.append(png)
    return paths
