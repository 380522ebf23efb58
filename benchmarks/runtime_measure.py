"""Measurements of the runtime itself (results in runs/measure/, with the machine's load average).

    python -m benchmarks.runtime_measure overhead RECIPE.toml [--rounds N] [--section.key=value ...]
        The Trainer's optimizer step against a hand-written loop over the same model, kernels, batches
        and optimizer settings, interleaved step by step in one process (so both see the same machine
        load); reports median ms per step and the tokens/s ratio.
    python -m benchmarks.runtime_measure kernels RECIPE.toml [--rounds N] [--section.key=value ...]
        The same run with fastft's kernels on and off (stock transformers + PEFT), two Trainers in one
        process, steps interleaved; median ms per step of each (peak memory needs separate processes:
        `make demo` measures it).
    python -m benchmarks.runtime_measure dtypes RECIPE.toml [--rounds N] [--section.key=value ...]
        The frozen base in fp32 and in bf16 (adapters and optimizer state fp32), each with fastft's kernels
        on and off: four Trainers in one process, steps interleaved; median ms per step, the bytes of the
        base weights, the first losses, and whether this CPU computes bf16 natively.
    python -m benchmarks.runtime_measure modes RECIPE.toml [--nproc 2] [--section.key=value ...]
        tokens/s of every parallel mode at N processes (one `fastft train --nproc N` run each).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.harness.timing import interleave

OUT = Path("runs/measure")


def _load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def overhead(recipe: str, overrides: list[str], rounds: int) -> dict:
    from fastft.runtime.config import load_config
    from fastft.runtime.trainer import Trainer

    cfg = load_config(recipe, [*overrides, f"--run.output_dir={OUT / 'overhead'}", "--run.progress=false"])
    trainer = Trainer(cfg)
    model, task, params = trainer.model, trainer.task, trainer.params
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                  **({"fused": True} if "fused" in trainer.optimizer.defaults and
                                     trainer.optimizer.defaults["fused"] else {"foreach": True}))
    model.train()

    def hand_step(step: int) -> None:
        """What a user would write: same batches, summed-token loss over the step's token count."""
        batches = trainer.micro_batches(step)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            model(**b, use_cache=False, num_items_in_batch=torch.tensor(float(n))).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens = []
    # round 0 warms both up; the round index is the step (the same batches for both)
    times = interleave({"runtime": lambda step: tokens.append(trainer.train_step(step)["tokens"]),
                        "hand": hand_step}, rounds, warmup_rounds=1, alternate=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"ms_per_step": median,
            "runtime_tokens_per_s_vs_hand": median["hand"] / median["runtime"],
            "tokens_per_step": statistics.mean(tokens), "rounds": rounds, "load": _load()}


def interleaved_trainers(recipe: str, overrides: list[str], variants: dict, rounds: int) -> tuple[dict, dict, dict]:
    """One Trainer per variant (name -> its extra overrides) in this process, their steps interleaved:
    (trainers, losses per variant, median ms per step per variant)."""
    from fastft.runtime.config import load_config
    from fastft.runtime.trainer import Trainer

    trainers = {}
    for name, extra in variants.items():
        cfg = load_config(recipe, [*overrides, f"--run.output_dir={OUT / name}", "--run.progress=false", *extra])
        trainers[name] = Trainer(cfg)
        trainers[name].model.train()
    losses = {name: [] for name in trainers}

    def step_of(name):
        return lambda step: losses[name].append(trainers[name].train_step(step)["loss"])

    times = interleave({name: step_of(name) for name in trainers}, rounds, warmup_rounds=1, alternate=True)
    return trainers, losses, {k: statistics.median(v) for k, v in times.items()}


def kernels(recipe: str, overrides: list[str], rounds: int) -> dict:
    _, losses, median = interleaved_trainers(recipe, overrides, {"fastft": ["--kernels.enabled=true"],
                                                                 "hf_peft": ["--kernels.enabled=false"]}, rounds)
    return {"ms_per_step": median,
            "fastft_time_vs_hf_peft": median["fastft"] / median["hf_peft"],
            "max_loss_difference": max(abs(a - b) for a, b in zip(losses["fastft"], losses["hf_peft"])),
            "rounds": rounds, "load": _load()}


def dtypes(recipe: str, overrides: list[str], rounds: int) -> dict:
    from fastft.runtime.models import NATIVE_BF16_CPU_FLAGS, cpu_flags

    variants = {f"{name}_{dtype}": [f"--kernels.enabled={enabled}", f"--model.dtype={dtype}"]
                for dtype in ("float32", "bfloat16") for name, enabled in (("fastft", "true"), ("hf_peft", "false"))}
    trainers, losses, median = interleaved_trainers(recipe, overrides, variants, rounds)
    frozen_mb = {name: sum(p.numel() * p.element_size() for p in t.model.parameters() if not p.requires_grad) / 2**20
                 for name, t in trainers.items()}
    return {"ms_per_step": median,
            "time_vs_hf_peft_float32": {k: v / median["hf_peft_float32"] for k, v in median.items()},
            "frozen_base_mb": frozen_mb, "first_losses": {k: v[:3] for k, v in losses.items()},
            "native_bf16_cpu_flags": sorted(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS)),
            "rounds": rounds, "load": _load()}


def modes(recipe: str, overrides: list[str], nproc: int) -> dict:
    out = {}
    for mode in ("ddp", "zero1", "zero2", "fsdp2", "hsdp"):
        target = OUT / f"mode_{mode}"
        before = _load()
        cmd = [sys.executable, "-m", "fastft", "train", recipe, *overrides, f"--nproc={nproc}",
               f"--parallel.mode={mode}", f"--run.output_dir={target}", "--run.resume=false", "--run.overwrite=true",
               "--run.progress=false",
               "--eval.at_start=false", "--eval.at_end=false", "--checkpoint.at_end=false", "--run.plots=false"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((target / "summary.json").read_text())
        out[mode] = {"tokens_per_s": summary["tokens_per_s"], "ms_per_step": summary["seconds_per_step"] * 1e3,
                     "peak_memory_mb_rank0": summary["peak_memory_mb"], "load_before": before, "load_after": _load()}
        print(mode, out[mode], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) < 2 or argv[0] not in ("overhead", "kernels", "dtypes", "modes"):
        raise SystemExit(__doc__)
    what, recipe, rest = argv[0], argv[1], argv[2:]
    rounds, nproc = 10, 2
    overrides = []
    for arg in rest:
        if arg.startswith("--rounds="):
            rounds = int(arg.split("=", 1)[1])
        elif arg.startswith("--nproc="):
            nproc = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    OUT.mkdir(parents=True, exist_ok=True)
    if what == "modes":
        result = modes(recipe, overrides, nproc)
    else:
        result = {"overhead": overhead, "kernels": kernels, "dtypes": dtypes}[what](recipe, overrides, rounds)
    result = {"recipe": recipe, "overrides": overrides, "torch_threads": torch.get_num_threads(), **result}
    (OUT / f"{what}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
