"""The training loop: torch.distributed engines, exact loss normalization, checkpoints, metrics.

One optimizer step:
1. This rank's ``grad_accum`` micro-batches of the step (a pure function of seed and step).
2. Loss units (response tokens) counted before any forward, summed over micro-batches and ranks
   (one all_reduce): N. Each micro-batch's loss is its *summed* token loss times world / N, so after
   DDP/FSDP's gradient averaging the gradient is exactly d(total loss / N) for any accumulation and
   world size (HF Trainer's 2024 accumulation bug was a mean of per-micro-batch means).
3. Gradients synchronise on the last micro-batch only (DDP no_sync / FSDP set_requires_gradient_sync).
4. Unscale (fp16), clip by the global norm (DTensor-aware under FSDP), step, schedule.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from .checkpoint import Checkpointer, has_checkpoints, resume_settings, warn
from .config import Config, ConfigError
from .data import step_micro_batches
from .memory import MemoryMeter
from .models import build_model, export_methods, prepare_model
from .parallel import (FSDP_MODES, Dist, all_reduce_max, all_reduce_sum, apply_activation_checkpointing,
                       compile_blocks, init_distributed, unwrap, wrap)
from .tasks import build_task, import_recipe


class Callback:
    """Hooks for what a recipe adds to the loop: schedules of other coefficients (``on_step_begin``),
    extra loss terms (``extra_loss``: a per-step mean, added to every micro-batch divided by
    grad_accum), logging and eval observers."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_step_begin(self, trainer: "Trainer", step: int) -> None: ...
    def extra_loss(self, trainer: "Trainer", model: nn.Module, batch: dict) -> Optional[torch.Tensor]: return None
    def on_log(self, trainer: "Trainer", record: dict) -> None: ...
    def on_eval(self, trainer: "Trainer", step: int, metrics: dict) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self, trainer: "Trainer") -> dict:
        """What a resumed run needs back (saved in every checkpoint). The keys and tensor shapes must be
        the same whenever it is called, as the load fills this dict in place: keep a placeholder
        (zeros, None) for state that does not exist yet."""
        return {}

    def load_state_dict(self, trainer: "Trainer", state: dict) -> None: ...


def lr_lambda(cfg: Config):
    o, total = cfg.optim, cfg.run.max_steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        decay_steps = max(1, round(total * o.decay_fraction))  # wsd: warm-up, stable, linear decay
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * max(0.0, (total - step) / decay_steps)
    return factor


def _fused_adamw_ok(params: list, device: torch.device) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    return device.type in _get_fused_kernels_supported_devices() and all(p.dtype.is_floating_point for p in params)


class TrainState(Stateful):
    """The loop's state a resume needs beyond model, optimizer, scheduler and RNG (torchtitan's TrainState):
    the step, early stopping, and each callback's state. The Checkpointer saves ``state_dict()`` with every
    step (its "trainer" entry, where it adds the step) and hands that entry to ``load_state_dict`` on a resume;
    the dict ``state_dict`` returns is also the template the load fills in, so its keys and shapes must not
    change between calls (see ``Callback.state_dict``)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def stateful_callbacks(self) -> dict:
        return {f"{i}_{type(cb).__name__}": cb for i, cb in enumerate(self.trainer.callbacks)
                if type(cb).state_dict is not Callback.state_dict}

    def state_dict(self) -> dict:
        t = self.trainer
        return {"best": t.best, "bad_evals": t.bad_evals,
                "callbacks": {key: cb.state_dict(t) for key, cb in self.stateful_callbacks().items()}}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = int(state["step"])
        t.best, t.bad_evals = state["best"], int(state["bad_evals"])
        for key, cb in self.stateful_callbacks().items():
            cb.load_state_dict(t, state["callbacks"][key])


class Trainer:
    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = (), task=None):
        """Validates everything it can (data, model, config combinations) before writing anything."""
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.d: Dist = init_distributed(cfg.parallel.mode)
        torch.manual_seed(cfg.run.seed)
        import_recipe(cfg)
        self.model, self.tokenizer = build_model(cfg)
        self.task = task if task is not None else build_task(cfg, self.tokenizer)
        self.callbacks += self.task.callbacks()
        if self.d.is_rank0 and cfg.run.tracker != "none":
            from .reporting import make_tracker

            self.callbacks.append(make_tracker(cfg.run.tracker, cfg.run.output_dir))
        model = prepare_model(self.model, cfg)
        self.ac_blocks = apply_activation_checkpointing(model, cfg.memory.activation_checkpointing, cfg.memory.every_k)
        self.compiled_blocks = compile_blocks(model) if cfg.compile.enabled else 0
        self.model = wrap(model, cfg, self.d)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad")
        self.optimizer = self._optimizer()
        # on the ZeRO optimizer itself: it copies its param_groups' lr into the local optimizer every step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = torch.amp.GradScaler(self.d.device.type) if cfg.precision.dtype == "fp16" else None
        self.output = Path(cfg.run.output_dir)
        self.checkpointer = Checkpointer(self.output / "checkpoints", self.model, self.optimizer, self.scheduler,
                                         self.scaler, self.d, zero1=cfg.parallel.mode == "zero1" and self.d.active,
                                         settings=resume_settings(cfg, self.d.world), train_state=TrainState(self))
        if not cfg.run.resume and not cfg.run.overwrite and has_checkpoints(self.checkpointer.root):
            raise ConfigError(f"{self.checkpointer.root} holds the checkpoints of an earlier run and run.resume = false "
                              "would start over on top of them: resume it (--run.resume=true), pick another "
                              "--run.output_dir, or replace them with --run.overwrite=true")
        self.step = 0
        self.best: Optional[float] = None
        self.bad_evals = 0
        self.history: list[dict] = []
        self.eval_history: list[dict] = []

    # -- construction ---------------------------------------------------------------------------
    def _optimizer(self):
        o = self.cfg.optim
        fused = {"auto": _fused_adamw_ok(self.params, self.d.device), "true": True, "false": False}[o.fused]
        kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
        if fused:
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
        groups = self.task.param_groups(self.model, self.params) or self.params
        if self.cfg.parallel.mode == "zero1" and self.d.active:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def _autocast(self):
        p = self.cfg.precision
        if p.dtype == "fp32" or (p.impl == "fsdp" and self.cfg.parallel.mode in FSDP_MODES and self.d.active):
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16 if p.dtype == "bf16" else torch.float16)

    def _sync_context(self, sync: bool):
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()

    # -- the loop -------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        c = self.cfg
        groups = step_micro_batches(self.task.train_samples, c.run.seed, step, c.batch.micro_batch_size,
                                    c.batch.grad_accum, self.d.rank, self.d.world)
        return [{k: v.to(self.d.device) for k, v in self.task.collate(g).items()} for g in groups]

    def train_step(self, step: int) -> dict:
        for cb in self.callbacks:
            cb.on_step_begin(self, step)
        batches = self.micro_batches(step)
        dev = self.d.device
        counts = torch.zeros(3, dtype=torch.float64, device=dev)  # loss units, input tokens, padded tokens
        for b in batches:
            counts[0] += self.task.count(b)
            counts[1] += b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
            counts[2] += b["input_ids"].numel()
        all_reduce_sum(counts, self.d)
        normalizer = (counts[0].clamp_min(1) / self.d.world).float()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, b in enumerate(batches):
            with self._sync_context(i == len(batches) - 1), self._autocast():
                loss = self.task.loss(self.model, b, normalizer)
                for cb in self.callbacks:
                    extra = cb.extra_loss(self, self.model, b)
                    if extra is not None:
                        loss = loss + extra / len(batches)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach().double()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        all_reduce_sum(loss_sum, self.d)
        return {"loss": float(loss_sum) / self.d.world, "grad_norm": float(grad_norm), "lr": lr,
                "loss_tokens": int(counts[0]), "tokens": int(counts[1]), "padded_tokens": int(counts[2])}

    def evaluate(self) -> dict:
        metrics = self.task.evaluate(self.model, self.d)
        for cb in self.callbacks:
            cb.on_eval(self, self.step, metrics)
        if metrics:
            self.eval_history.append({"step": self.step, **metrics})
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    def _should_stop(self, metrics: dict) -> bool:
        """Early stopping on eval.metric; the decision is agreed across ranks (max of the flags)."""
        patience = self.cfg.eval.early_stopping_patience
        name = self.cfg.eval.metric
        if patience <= 0 or name not in metrics:
            return False
        value = metrics[name]
        greater = self.task.metrics.get(name, False)
        if self.best is None or (value > self.best if greater else value < self.best):
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        flag = torch.tensor(1.0 if self.bad_evals >= patience else 0.0, device=self.d.device)
        return bool(all_reduce_max(flag, self.d) > 0)

    def _log(self, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_log(self, record)
        if self.d.is_rank0:
            with open(self.output / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def resume(self, restore_rng: bool = True) -> bool:
        """Continues from the newest complete checkpoint (run.resume, and not run.overwrite); says so on
        the console, and warns about each damaged step passed over."""
        if not self.cfg.run.resume or self.cfg.run.overwrite:
            return False
        path, notes = self.checkpointer.resume_step()
        if self.d.is_rank0:
            for note in notes:
                warn(note)
        if path is None:
            return False
        self.checkpointer.load(path, restore_rng=restore_rng)  # restores TrainState too: self.step, ...
        if self.d.is_rank0:
            print(f"resumed from step {self.step} of {path}", flush=True)
        return True

    def save(self) -> Path:
        return self.checkpointer.save(self.step, self.cfg.checkpoint.keep)

    def close(self) -> None:
        """Drop the model, optimizer and checkpointer and collect them now, while the interpreter is
        alive: FSDP2 / DDP state sits in reference cycles whose pending collectives, freed only at
        interpreter exit, can abort it (gloo: "terminate called without an active exception"). Call it
        before ``torch.distributed.destroy_process_group()``, as ``fastft train`` does."""
        import gc

        for name in ("checkpointer", "scheduler", "optimizer", "params", "model"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()

    def fit(self) -> dict:
        c = self.cfg
        if self.d.is_rank0:
            if c.run.overwrite and self.checkpointer.root.exists():  # asked for: start over here
                shutil.rmtree(self.checkpointer.root)
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
        resumed = self.resume()
        if self.d.is_rank0 and not resumed and (self.output / "metrics.jsonl").exists():
            (self.output / "metrics.jsonl").unlink()  # a fresh run's log starts empty
        for cb in self.callbacks:
            cb.on_train_begin(self)
        summary: dict = {"resumed_from": self.step if resumed else None, "kernels": dataclasses.asdict(c.kernels.stack),
                         "compiled_blocks": self.compiled_blocks,
                         "world_size": self.d.world, "mode": c.parallel.mode if self.d.active else "single"}
        if c.eval.at_start and not resumed:
            summary["eval_start"] = self.evaluate()
        from .reporting import Progress

        bar = Progress(c.run.max_steps, initial=self.step) if self.d.is_rank0 and c.run.progress else None
        timed: list[dict] = []
        stopped = False
        self.model.train()
        meter = MemoryMeter(self.d.device)
        meter.start(self.model)
        while self.step < c.run.max_steps:
            start = time.perf_counter()
            record = self.train_step(self.step)
            seconds = time.perf_counter() - start
            self.step += 1
            record.update(step=self.step, seconds=seconds, tokens_per_s=record["tokens"] / seconds,
                          padded_tokens_per_s=record["padded_tokens"] / seconds,
                          peak_memory_mb=meter.peak())
            self.history.append(record)
            timed.append(record)
            logged = self.step % c.run.log_every == 0 or self.step == c.run.max_steps
            if logged:
                self._log(record)
            if bar is not None:
                bar.update(self.step, record, logged)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {self.step}; stopping (no checkpoint)")
            if c.eval.every and self.step % c.eval.every == 0 and self.step < c.run.max_steps:
                meter.pause()
                stopped = self._should_stop(self.evaluate())
                meter.resume()
            if c.checkpoint.every and self.step % c.checkpoint.every == 0 and self.step < c.run.max_steps:
                self.save()
            if stopped:
                break
        if bar is not None:
            bar.close()
        train_peak_mb = meter.peak()
        if c.eval.at_end:
            summary["eval_end"] = self.evaluate()
        if c.checkpoint.at_end:
            summary["checkpoint"] = str(self.save())
        if c.run.export_methods:
            summary["exported"] = export_methods(unwrap(self.model), self.output, self.d.is_rank0)
        steady = timed[1:] or timed  # the first step pays one-off costs (allocations, lazy init)
        if steady:
            total_s = sum(r["seconds"] for r in steady)
            summary.update(steps=self.step, stopped_early=stopped, final_loss=timed[-1]["loss"],
                           seconds_per_step=total_s / len(steady),
                           tokens_per_s=sum(r["tokens"] for r in steady) / total_s,
                           padded_tokens_per_s=sum(r["padded_tokens"] for r in steady) / total_s,
                           peak_memory_mb=train_peak_mb, resident_memory_mb=meter.resident_mb)
        if self.d.is_rank0:
            (self.output / "summary.json").write_text(json.dumps(summary, indent=2))
            if c.run.plots:
                from .plots import plot_curves

                plot_curves(self.output / "metrics.jsonl", self.output / "curves.png", c.eval.metric,
                            loss_unit=self.task.loss_unit)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return summary
