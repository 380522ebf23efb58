"""`make demo`: every registered op benchmark, default shapes for the device (CUDA when present).

Each op registers itself by name in BENCHES below; its module ``benchmarks/bench_<name>.py``
exposes ``main(argv) -> int`` (see benchmarks/harness.py). Options after the known ones are passed
on to every benchmark, e.g. ``python -m benchmarks.run_demo --only cross_entropy -- --n 2048``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

# Order = run order; each name is benchmarks/bench_<name>.py.
BENCHES = ["cross_entropy", "linear_cross_entropy", "lora", "kl", "adapter"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=BENCHES, metavar="NAME",
                   help=f"run only this benchmark (repeatable); one of {BENCHES}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.list:
        print("\n".join(BENCHES))
        return 0
    status = {}
    for name in args.only or BENCHES:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.bench_{name}")
        bench_argv = ["--device", args.device] + (["--quick"] if args.quick else []) + rest
        try:
            status[name] = module.main(bench_argv)
        except Exception as exc:  # one broken benchmark must not hide the others' results
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status[name] = 1
        print(f"=== {name}: {'ok' if status[name] == 0 else 'FAILED'} in {time.perf_counter() - t0:.0f} s ===")
    return 0 if all(v == 0 for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
