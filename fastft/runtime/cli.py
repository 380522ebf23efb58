"""`fastft train CONFIG.toml [--section.key=value ...] [--nproc N]`; `fastft train --help [SECTION]` lists
every key with its type, default, choices and doc (generated from the config dataclasses: config_docs).

One process by default. A bad config, data file, model or checkpoint ends with exit code 2 and one
line naming the problem; ``--debug`` (or ``FASTFT_DEBUG=1``) raises it with its traceback instead. ``--nproc N`` (or ``parallel.nproc``) relaunches the same command through
``torch.distributed.run`` on this node; under torchrun (``torchrun -m fastft train ...``, multi-node
included) the environment's rank and world size are used as they are.
"""
from __future__ import annotations

import os
import subprocess
import sys

USAGE = "usage: fastft train [CONFIG.toml] [--section.key=value ...] [--nproc N] [--debug] [--help [SECTION]]"
DEBUG_ENV = "FASTFT_DEBUG"  # =1: the same as --debug


class HelpRequested(Exception):
    """``--help [SECTION]`` on the command line: print the generated help instead of training."""

    def __init__(self, section: str | None):
        super().__init__(section)
        self.section = section


def split_args(argv: list[str]) -> tuple[str | None, list[str], int | None]:
    """(config path, overrides, --nproc) of the command line."""
    path, overrides, nproc = None, [], None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            section = args[0] if args and not args[0].startswith("-") and not args[0].endswith(".toml") else None
            raise HelpRequested(section)
        if arg == "--debug":
            continue
        if arg == "--nproc":
            if not args:
                raise ValueError("--nproc needs a number")
            arg = "--nproc=" + args.pop(0)
        if arg.startswith("--nproc="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--nproc must be a positive integer, got {value!r}")
            nproc = int(value)
        elif arg.startswith("--"):
            overrides.append(arg)
        elif path is None:
            path = arg
        else:
            raise ValueError(f"unexpected argument {arg!r}; {USAGE}")
    return path, overrides, nproc


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str]) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError, load_config
    from .data import DataError
    from .models import ModelLoadError

    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        path, overrides, nproc = split_args(argv)
    except HelpRequested as request:
        from .config_docs import help_text

        try:
            print(help_text(request.section, usage=USAGE), end="")
        except ValueError as exc:  # an unknown section
            print(f"fastft train: error: {exc}", file=sys.stderr)
            return 2
        return 0
    except ValueError as exc:
        if debug:
            raise
        print(f"fastft train: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(path, overrides)
    except (ValueError, ConfigError) as exc:
        if debug:
            raise
        print(f"fastft train: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    nproc = nproc or cfg.parallel.nproc
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        forwarded = [a for a in argv if not a.startswith("--nproc")]
        if "--nproc" in argv:  # drop the separate value too
            i = argv.index("--nproc")
            forwarded = [a for j, a in enumerate(argv) if j not in (i, i + 1)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fastft", "train", *forwarded]
        return subprocess.call(cmd)
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg)
        summary = trainer.fit()
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as exc:
        if debug:
            raise
        print(f"fastft train: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    # torch.distributed's documented shutdown, on success only (after a failure on one rank the others
    # may be inside a collective, and destroying the group would hang them)
    trainer.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _print_summary(summary: dict) -> None:
    start, end = summary.get("eval_start", {}), summary.get("eval_end", {})
    for key in sorted(set(start) | set(end)):
        before = f"{start[key]:.4f}" if key in start else "-"
        after = f"{end[key]:.4f}" if key in end else "-"
        print(f"eval {key}: {before} -> {after}")
    if "tokens_per_s" in summary:
        print(f"steps {summary['steps']}: {summary['seconds_per_step'] * 1e3:.0f} ms/step, "
              f"{summary['tokens_per_s']:.0f} tokens/s ({summary['padded_tokens_per_s']:.0f} padded), "
              f"peak memory {summary['peak_memory_mb']:.0f} MiB, final loss {summary['final_loss']:.4f}")
