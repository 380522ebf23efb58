"""Checkpoints through torch.distributed.checkpoint (DCP).

Layout under ``<output_dir>/checkpoints``::

    step_00000020/      one DCP checkpoint: trainable model parameters, optimizer, scheduler, step,
                        data position, grad scaler, and every rank's RNG states (key rng.rank<r>)
    latest              the name of the last complete checkpoint

A save goes to ``step_N.tmp`` first; only when every rank has finished writing does rank 0 rename it
to ``step_N`` and then replace ``latest`` (written to ``latest.tmp``, then an atomic ``os.replace``).
A run killed or failing mid-save leaves a ``.tmp`` folder behind and ``latest`` pointing at the last
good checkpoint, which is never written over. DCP stores sharded (DTensor) state by global index, so
a checkpoint loads under another world size or parallel mode (resharding); per-rank RNG states are
restored where the rank existed before. ZeRO-1's optimizer shards are per rank and need the same
world size.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

LATEST = "latest"


def _rng_state() -> dict:
    words, gauss = _python_rng_tensor()
    state = {"torch": torch.get_rng_state(), "python": words, "python_gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_rng_tensor() -> torch.Tensor:
    """random's Mersenne state (version, 625 words, cached gauss) as a fixed-size tensor: DCP loads
    into a tensor of the saved size."""
    version, words, gauss = random.getstate()
    return torch.tensor([version, *words, -1 if gauss is None else 0], dtype=torch.int64), torch.tensor(
        [0.0 if gauss is None else gauss], dtype=torch.float64)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    words, gauss = state["python"], state["python_gauss"]
    random.setstate((int(words[0]), tuple(int(w) for w in words[1:-1]), None if int(words[-1]) == -1 else float(gauss[0])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns on every save/load without a process group ("assuming the intent is to ... in a single
    process"); a one-process run is exactly that, so the warning is silenced there, and only there."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name!r}, which does not exist")
    return path


class Checkpointer:
    """Saves and restores a run's state. ``zero1``: the optimizer is a ZeroRedundancyOptimizer."""

    def __init__(self, root: str | Path, model, optimizer, scheduler, scaler, d, zero1: bool):
        self.root = Path(root)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.d, self.zero1 = d, zero1
        self.options = StateDictOptions(ignore_frozen_params=True)
        self.extra: dict = {}  # more trainer state (early stopping), saved with the step

    def _state(self, step: int) -> dict:
        state = {"model": get_model_state_dict(self.model, options=self.options),
                 "trainer": {"step": step, "scheduler": self.scheduler.state_dict(),
                             "data_position": step, **self.extra},
                 f"rng.rank{self.d.rank}": _rng_state()}
        if self.zero1:  # ZeroRedundancyOptimizer: this rank's shard of the state
            state[f"optim.rank{self.d.rank}"] = self.optimizer.optim.state_dict()
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if self.scaler is not None:
            state["trainer"]["scaler"] = self.scaler.state_dict()
        return state

    def save(self, step: int, keep: int) -> Path:
        from .parallel import barrier

        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.d.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.d)
        with _single_process_is_intended():
            dcp.save(self._state(step), checkpoint_id=str(tmp))
        barrier(self.d)  # every rank has written its part
        if self.d.is_rank0:
            if final.exists():  # a fresh run reaching a step an earlier run saved: keep both, the new one is latest
                final = self.root / f"step_{step:08d}_{time.strftime('%Y%m%d%H%M%S')}"
            os.rename(tmp, final)
            pointer_tmp = self.root / (LATEST + ".tmp")
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.root / LATEST)
            self._prune(keep)
        barrier(self.d)
        return final

    def _prune(self, keep: int) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, restore_rng: bool = True) -> dict:
        """Restores model, optimizer, scheduler, scaler and (when the rank saved one) RNG; returns the
        trainer state (step, data position)."""
        state = self._state(0)
        if restore_rng:
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
            saved_keys = {k.split(".")[0] + "." + k.split(".")[1] for k in metadata.state_dict_metadata
                          if k.startswith("rng.")}
            if f"rng.rank{self.d.rank}" not in saved_keys:
                state.pop(f"rng.rank{self.d.rank}")
        else:
            state.pop(f"rng.rank{self.d.rank}")
        if self.zero1:
            key = f"optim.rank{self.d.rank}"
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
            if not any(k.startswith(key + ".") or k == key for k in metadata.state_dict_metadata):
                raise ValueError(f"{path}: no ZeRO-1 optimizer shard for rank {self.d.rank}; ZeRO-1 resumes need "
                                 "the same world size")
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(path))
        # frozen parameters come from the model source, not the checkpoint: the load is non-strict, and
        # the template (this model's trainable state) guarantees every trainable tensor was read
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
        if self.zero1:
            self.optimizer.optim.load_state_dict(state[f"optim.rank{self.d.rank}"])
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=self.options)
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        if self.scaler is not None and "scaler" in state["trainer"]:
            self.scaler.load_state_dict(state["trainer"]["scaler"])
        if f"rng.rank{self.d.rank}" in state:
            _set_rng_state(state[f"rng.rank{self.d.rank}"])
        return state["trainer"]
