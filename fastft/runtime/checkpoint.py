"""Checkpoints through torch.distributed.checkpoint (DCP), with a lifecycle that cannot lose a good step.

Layout under ``<output_dir>/checkpoints``::

    step_00000020/      one DCP checkpoint: the trainable parameters only (frozen weights, tied ones
                        included, come back from the model source), optimizer, scheduler, step, data
                        position, grad scaler, every rank's RNG states (key rng.rank<r>), and
        manifest.json   written last: every file's size and sha256, and the settings a resume must share
    step_00000020-1/    the same step saved again by a later run of the folder (ordered after step_00000020)
    latest              the name of the last complete checkpoint

A save goes to ``step_N.tmp``; when every rank has written, rank 0 hashes the files into the manifest
(``manifest.json.tmp`` → ``os.replace``), renames the folder to ``step_N`` and only then replaces
``latest`` (``latest.tmp`` → ``os.replace``). Pruning keeps the ``keep`` newest steps by (step, run) and
never the step just written or the one ``latest`` names. A resume takes the newest step whose manifest
matches its files; a step that fails the check is skipped with a warning (an interrupted or damaged
save), and none left is a one-line ``CheckpointError``. A config whose model, methods, data or optimizer
settings differ from the checkpoint's is a ``CheckpointMismatch`` naming the keys. DCP stores sharded
(DTensor) state by global index, so a checkpoint loads under another world size or parallel mode
(resharding); per-rank RNG states are restored where the rank existed before. ZeRO-1's optimizer
shards are per rank and need the same world size.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .config import METHOD_SECTIONS

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# step_00000020, step_00000020-1 (the same step saved by a later run); step_00000020_<timestamp> is the
# name older versions gave a second save of a step
STEP_NAME = re.compile(r"^step_(\d+)(?:[-_](\d+))?$")
START_OVER = ("resume with the checkpoint's settings, or start over: --run.output_dir=<another folder>, or "
              "--run.overwrite=true to replace these checkpoints")


class CheckpointError(ValueError):
    """The checkpoints of a run cannot be used (the message names the folder and the way out)."""


class CheckpointMismatch(CheckpointError):
    """The config does not fit the checkpoint it would resume (model, methods, data or optimizer differ)."""


def step_order(path: Path) -> tuple[int, int]:
    """(step, run) of a step folder's name: the order of saves."""
    match = STEP_NAME.match(path.name)
    return int(match.group(1)), int(match.group(2) or 0)


def step_folders(root: str | Path) -> list[Path]:
    """Finished step folders (not ``.tmp``), oldest first, ordered by step number and then by run."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_NAME.match(p.name)), key=step_order)


def has_checkpoints(root: str | Path) -> bool:
    return bool(step_folders(root)) or (Path(root) / LATEST).exists()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a part (tmp file, fsync, os.replace)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(step: Path) -> dict:
    """The manifest of a step folder; ``CheckpointError`` (naming the reason) when the folder is not a
    complete checkpoint: manifest missing or unreadable, a file missing, of another size or hash."""
    try:
        manifest = json.loads((step / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files or not all(
                isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("sha256"), str)
                for want in files.values()):
            raise ValueError("unknown manifest format")
    except FileNotFoundError:
        raise CheckpointError(f"{step.name} has no {MANIFEST} (a save that did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{step.name}/{MANIFEST} is unreadable ({exc})") from None
    for name, want in files.items():
        path = step / name
        if not path.is_file():
            raise CheckpointError(f"{step.name}/{name} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{step.name}/{name} has {size} bytes, the manifest says {want['size']}")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{step.name}/{name} does not match its sha256 in the manifest")
    return manifest


def find_resume_step(root: str | Path) -> tuple[Optional[Path], list[str]]:
    """(the newest complete step folder, or None when the folder holds no checkpoint; one warning per
    step passed over). A folder whose every step is damaged is a ``CheckpointError``."""
    root = Path(root)
    steps = step_folders(root)
    notes: list[str] = []
    pointer = root / LATEST
    named = pointer.read_bytes().decode("utf-8", "replace").strip() if pointer.is_file() else None
    if named is not None and not (root / named).is_dir():
        notes.append(f"{pointer} names {named!r}, which does not exist")
    if not steps:
        if named is not None:
            raise CheckpointError(f"no checkpoint left in {root}: {notes[0]}; {START_OVER}")
        return None, notes
    problems = []
    for step in reversed(steps):
        try:
            read_manifest(step)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        notes += [f"{p}: skipped" for p in problems]
        if named is not None and named != step.name and (root / named).is_dir() and not problems:
            notes.append(f"{pointer} names {named!r} but {step.name} is newer and complete")
        return step, notes
    raise CheckpointError(f"no complete checkpoint in {root}: {'; '.join(problems)}; {START_OVER}")


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The step folder a resume would load (None: no checkpoint)."""
    return find_resume_step(root)[0]


def resume_settings(cfg, world: int) -> dict:
    """The settings a checkpoint was trained with that a resume must share: what shapes the trainable
    parameters (model, methods and their kernel switches), what the saved optimizer and scheduler hold
    (their learning rate, betas, eps and weight decay would be read back from the checkpoint, not the
    config), and what defines the data position (data, seed, global batch)."""
    c = cfg.to_dict()
    settings = {f"{section}.{key}": value for section in ("model", *METHOD_SECTIONS, "recipe")
                for key, value in c[section].items() if (section, key) != ("model", "convert_cache")}
    stack = cfg.kernels.stack  # fastft's or the stock implementation: the trainable parameters' names differ
    settings.update({f"kernels.{name} (in effect)": getattr(stack, name) for name in METHOD_SECTIONS})
    for key in ("data.task", "data.path", "data.generator", "data.num_train", "data.max_length", "data.packing",
                "run.seed", "optim.lr", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps"):
        section, name = key.split(".")
        settings[key] = c[section][name]
    settings["global batch (batch.micro_batch_size x batch.grad_accum x processes)"] = \
        cfg.batch.micro_batch_size * cfg.batch.grad_accum * world
    return json.loads(json.dumps(settings))  # as the manifest stores them (tuples become lists)


def settings_differ(saved: dict, now: dict) -> list[str]:
    return [f"{key} = {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
            for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


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


def trainable_names(model) -> set:
    """Names (as DCP's state dicts spell them) of the parameters that train. Every alias of a tied
    parameter is listed by ``remove_duplicate=False``, so a frozen ``lm_head.weight`` tied to the frozen
    embeddings is left out (``ignore_frozen_params`` alone keeps it: it sees the embedding's name only)."""
    from .parallel import unwrap

    return {name for name, p in unwrap(model).named_parameters(remove_duplicate=False) if p.requires_grad}


class Checkpointer:
    """Saves and restores a run's state. ``zero1``: the optimizer is a ZeroRedundancyOptimizer.
    ``settings``: what a resume must share with the checkpoint (``resume_settings``). ``train_state``: the
    loop's own state beyond model, optimizer, scheduler, scaler and RNG (a ``Stateful``, as torchtitan passes
    its TrainState): its ``state_dict()`` is saved in the checkpoint's "trainer" entry with the step, and on a
    load its ``load_state_dict`` gets that entry back (the step included)."""

    def __init__(self, root: str | Path, model, optimizer, scheduler, scaler, d, zero1: bool, settings: dict,
                 train_state: Optional[Stateful] = None):
        self.root = Path(root)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.d, self.zero1, self.settings = d, zero1, settings
        self.train_state = train_state
        self.options = StateDictOptions(ignore_frozen_params=True)
        self.current: Optional[Path] = None  # the step folder this run last saved or loaded
        self.current_step: Optional[int] = None

    def _model_state(self) -> dict:
        state = get_model_state_dict(self.model, options=self.options)
        trainable = trainable_names(self.model)
        missing = trainable - state.keys()
        if missing:  # a wrapper renamed parameters: saving would silently drop them
            raise RuntimeError(f"trainable parameters missing from the model's state dict: {sorted(missing)[:5]}")
        return {name: value for name, value in state.items() if name in trainable}

    def _state(self, step: int) -> dict:
        state = {"model": self._model_state(),
                 "trainer": {"step": step, "scheduler": self.scheduler.state_dict(),
                             "data_position": step,
                             **(self.train_state.state_dict() if self.train_state is not None else {})},
                 f"rng.rank{self.d.rank}": _rng_state()}
        if self.zero1:  # ZeroRedundancyOptimizer: this rank's shard of the state
            state[f"optim.rank{self.d.rank}"] = self.optimizer.optim.state_dict()
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if self.scaler is not None:
            state["trainer"]["scaler"] = self.scaler.state_dict()
        return state

    def _new_step_folder(self, step: int) -> Path:
        """``step_N``, or ``step_N-k`` when an earlier run of this folder left a ``step_N`` (a damaged
        one that the resume passed over, or one beyond the step this run resumed from)."""
        taken = {p.name for p in step_folders(self.root)}
        name, run = f"step_{step:08d}", 0
        while (f"{name}-{run}" if run else name) in taken:
            run += 1
        return self.root / (f"{name}-{run}" if run else name)

    def save(self, step: int, keep: int) -> Path:
        """Writes step ``step`` (skipped when this run already saved or loaded it: the state is the same)."""
        from .parallel import barrier

        if self.current_step == step and self.current is not None and self.current.is_dir():
            return self.current
        tmp = self.root / f"step_{step:08d}.tmp"
        final = self._new_step_folder(step)  # before any rank renames: every rank names it alike
        if self.d.is_rank0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):  # what saves killed midway left
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            tmp.mkdir()
        barrier(self.d)
        with _single_process_is_intended():
            dcp.save(self._state(step), checkpoint_id=str(tmp))
        barrier(self.d)  # every rank has written its part
        if self.d.is_rank0:
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
            _write_atomically(tmp / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files,
                                                          "settings": self.settings}, indent=1))
            os.rename(tmp, final)
            _write_atomically(self.root / LATEST, final.name)
            self._prune(keep, final)
        barrier(self.d)
        self.current, self.current_step = final, step
        return final

    def _prune(self, keep: int, newest: Path) -> None:
        """Keeps the ``keep`` newest steps up to ``newest`` (the one just written, which ``latest``
        names). An earlier save of the same step number and steps ordered after ``newest`` belong to a
        history this run did not resume (the resume passed over them: they failed the manifest check),
        so they go first."""
        step, _ = step_order(newest)
        steps = [p for p in step_folders(self.root) if p != newest]
        superseded = [p for p in steps if step_order(p)[0] >= step]
        older = [p for p in steps if step_order(p)[0] < step]
        for old in superseded + older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def resume_step(self) -> tuple[Optional[Path], list[str]]:
        """``find_resume_step`` decided on rank 0 and shared, so every rank loads the same step."""
        decision: list = [None]
        if self.d.is_rank0:
            try:
                path, notes = find_resume_step(self.root)
                decision[0] = ("ok", str(path) if path else None, notes)
            except CheckpointError as exc:
                decision[0] = ("error", str(exc), [])
        if self.d.active and self.d.world > 1:
            dist.broadcast_object_list(decision, src=0)
        kind, value, notes = decision[0]
        if kind == "error":
            raise CheckpointError(value)
        return (Path(value) if value else None), notes

    def load(self, path: Path, restore_rng: bool = True) -> dict:
        """Restores model, optimizer, scheduler, scaler, the train state and (when the rank saved one) RNG;
        returns the checkpoint's "trainer" entry (step, data position, the train state's keys). A checkpoint of other settings is a ``CheckpointMismatch``."""
        saved = read_manifest(path).get("settings", {})
        differ = settings_differ(saved, self.settings)
        if differ:
            more = f" (and {len(differ) - 1} more: {'; '.join(differ[1:])})" if len(differ) > 1 else ""
            raise CheckpointMismatch(f"{path} was trained with other settings: {differ[0]}{more}; {START_OVER}")
        state = self._state(0)
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        rng = f"rng.rank{self.d.rank}"
        if not restore_rng or not any(k.startswith(rng + ".") for k in metadata.state_dict_metadata):
            state.pop(rng)
        if self.zero1:
            key = f"optim.rank{self.d.rank}"
            if not any(k.startswith(key + ".") or k == key for k in metadata.state_dict_metadata):
                raise CheckpointMismatch(f"{path}: no ZeRO-1 optimizer shard for rank {self.d.rank}; ZeRO-1 resumes "
                                         f"need the world size they were saved with, or {START_OVER}")
        try:
            with _single_process_is_intended():
                dcp.load(state, checkpoint_id=str(path))
        except (Exception, dcp.CheckpointException) as exc:  # a BaseException: DCP's wrapper of every rank's failure
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            first = lines[-1] if lines else type(exc).__name__  # the last line is the failure itself
            raise CheckpointMismatch(f"{path} does not fit this model ({first[:300]}); {START_OVER}") from exc
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
        if self.train_state is not None:
            self.train_state.load_state_dict(state["trainer"])
        self.current, self.current_step = path, int(state["trainer"]["step"])
        return state["trainer"]


def warn(message: str) -> None:
    print(f"fastft train: warning: {message}", file=sys.stderr, flush=True)
