"""What a run shows while it trains: the progress line on rank 0 and an optional experiment tracker.

Progress: tqdm's bar on a terminal; elsewhere (CI, ``nohup``, a pipe) one plain line per logged step,
since a bar's carriage returns turn a log file into one unreadable line per refresh. Tracker
(``run.tracker``): ``tensorboard`` writes local event files to ``<output_dir>/tensorboard`` (offline:
``tensorboard --logdir runs/``), beside metrics.jsonl, which is always written.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, TextIO

from .trainer import Callback

TRACKERS = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


class Progress:
    """Rank 0's progress: ``update`` after each step, ``close`` at the end."""

    def __init__(self, total: int, initial: int = 0, stream: TextIO = sys.stderr, interactive: Optional[bool] = None):
        self.total, self.stream = total, stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self.bar = None
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", file=stream, dynamic_ncols=True)

    def update(self, step: int, record: dict, logged: bool) -> None:
        """One step done; ``logged``: this step's record went to metrics.jsonl (the plain line follows it)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        elif logged:
            print(f"step {step}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"{record['seconds'] * 1e3:.0f} ms", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoardTracker(Callback):
    """A trainer callback writing every metrics.jsonl record as TensorBoard scalars (``train/<key>``,
    ``eval/<metric>``) at its step. Needs the ``tensorboard`` package (a pinned dependency)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ImportError(f"run.tracker = 'tensorboard' needs the tensorboard package: {exc}") from exc
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_log(self, trainer, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, global_step=step)

    def on_train_end(self, trainer) -> None:
        self.writer.flush()
        self.writer.close()


def make_tracker(name: str, output_dir: str | Path) -> Optional[TensorBoardTracker]:
    """The tracker ``run.tracker`` names (None for ``none``)."""
    if name not in TRACKERS:
        raise ValueError(f"run.tracker must be one of {', '.join(TRACKERS)}, got {name!r}")
    if name == "tensorboard":
        return TensorBoardTracker(Path(output_dir) / TENSORBOARD_DIR)
    return None
