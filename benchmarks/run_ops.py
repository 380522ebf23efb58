"""`make bench`: every registered op benchmark, then the model-step benchmark, default shapes for the device
(CUDA when present).

The list comes from fastft.ops.registry: each registered op names the ``benchmarks/bench_<name>.py``
that measures it (one module may cover several ops, e.g. bench_kl); each module is run through
``harness.main(module, argv)`` (see benchmarks/harness/). Options after the known ones are passed
on to every benchmark, e.g. ``python -m benchmarks.run_ops --only cross_entropy -- --n 2048``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from benchmarks import harness


def registered_benches() -> list:
    """benchmarks/bench_<name>.py modules named by the registered ops, in registration order (those present)."""
    import importlib.util

    from fastft.ops import registry

    names = []
    for entry in registry.entries():
        name = entry.benchmark
        if name and name not in names and importlib.util.find_spec(f"benchmarks.bench_{name}") is not None:
            names.append(name)
    return names


# Benchmarks of a whole training step rather than of one op (run after the op benchmarks)
MODEL_BENCHES = ["model_step"]
BENCHES = registered_benches() + MODEL_BENCHES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_ops", description=__doc__.split("\n\n")[0])
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
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(harness.expected_duration_text(device, ops=args.only or BENCHES, quick=args.quick), flush=True)
    status = {}
    for name in args.only or BENCHES:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.bench_{name}")
        bench_argv = ["--device", args.device] + (["--quick"] if args.quick else []) + rest
        try:
            status[name] = harness.main(module, bench_argv)
        except Exception as exc:  # one broken benchmark must not hide the others' results
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status[name] = 1
        print(f"=== {name}: {'ok' if status[name] == 0 else 'FAILED'} in {time.perf_counter() - t0:.0f} s ===")
    return 0 if all(v == 0 for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
