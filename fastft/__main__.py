"""`python -m fastft info | train`: versions, and per op which backends are built and usable here (and why not)."""
from __future__ import annotations

import argparse
import platform
import sys

# Every public op and the backends it implements; `info` reports each.
OPS = {
    "cross_entropy": ("reference", "cpp", "triton", "cuda"),
    "linear_cross_entropy": ("reference", "cpp", "triton", "cuda"),
    "lora_linear": ("reference", "cpp", "triton"),
    "full_kl / selective_log_softmax / linear_full_kl": ("reference", "cpp", "triton"),
    "adapter": ("reference", "cpp", "triton"),
}


def _versions() -> list[tuple[str, str]]:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__)]
    for name in ("triton", "transformers", "peft", "liger_kernel"):
        try:
            mod = __import__(name)
            rows.append((name, getattr(mod, "__version__", "installed")))
        except Exception as exc:  # an optional dependency: report, never fail
            rows.append((name, f"not available ({type(exc).__name__})"))
    rows.append(("cuda", torch.version.cuda or "none (CPU build of torch)"))
    rows.append(("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"))
    return rows


def info() -> int:
    import fastft
    from fastft import backend

    print(f"fastft {fastft.__version__}")
    for name, version in _versions():
        print(f"  {name:<13} {version}")
    ext = backend.extension()
    if ext is not None:
        print(f"  {'fastft._C':<13} built (cpu: {ext.cpu_capability}, cuda kernels: {ext.with_cuda})")
    else:
        print(f"  {'fastft._C':<13} missing: {backend.extension_error()}")
    print("\nops and backends (default: CUDA tensors -> triton, CPU tensors -> cpp):")
    for op, names in OPS.items():
        print(f"  {op}")
        for name in names:
            ok, why = backend.status(name)
            print(f"    {name:<10} {'usable' if ok else 'unusable':<9} {why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the training runtime parses its own arguments (config file + dotted overrides)
        from fastft.runtime.cli import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fastft")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions and per-op backend availability")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return info()
    return 1


if __name__ == "__main__":
    sys.exit(main())
