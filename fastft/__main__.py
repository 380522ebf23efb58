"""`python -m fastft info | train`: versions, and per op which backends are built and usable here (and why not)."""
from __future__ import annotations

import argparse
import platform
import sys

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
    from fastft.ops import registry

    print("\nops and backends (fastft.ops.registry; default: CUDA tensors -> triton, else cuda; CPU tensors -> cpp;")
    print("a backend an op lacks falls back to that op's default; fp64 on triton/cuda runs the reference):")
    for entry in registry.entries():
        print(f"  {entry.name}")
        for name, (ok, why) in entry.status().items():
            print(f"    {name:<10} {'usable' if ok else 'unusable':<9} {why}")
        for device, order, why in backend.preference_notes(entry.name):
            print(f"    default on {device}: {' > '.join(order)}: {why}")
    return 0


SUBCOMMANDS = {
    "info": "versions, and per op which backends are built and usable here (and why not)",
    "train": "fine-tune from a TOML config with --section.key=value overrides (fastft train --help: every key)",
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The ``fastft`` console script and ``python -m fastft``: the same subcommands, the same help."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if prog is None:
        prog = "python -m fastft" if sys.argv and sys.argv[0].endswith("__main__.py") else "fastft"
    if argv[:1] == ["train"]:  # the training runtime parses its own arguments (config file + dotted overrides)
        from fastft.runtime.cli import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog=prog, description="fastft: fused kernels and a lean runtime for fine-tuning")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, text in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=name != "train")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return info()
    return 1


if __name__ == "__main__":
    sys.exit(main())
