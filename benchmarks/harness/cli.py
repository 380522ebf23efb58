"""The command line of every ``bench_<op>.py``: ``harness.main(module, argv)``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .duration import reference_seconds
from .paths import OUT_DIR
from .providers import Options
from .report import metadata, save, table
from .runner import interleaved, run


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
