"""Shared by the runtime tests and their torchrun worker: a tiny config-built model and uneven data."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from fastft.runtime.config import Config, replace
from fastft.runtime.tasks import CausalLMTask, register_task


def write_uneven_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Instruction records whose responses have very different lengths (1..24 bytes), so micro-batches
    hold different numbers of loss tokens; a few chat records with two assistant turns."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 24)))
        if i % 8 == 7:
            lines.append({"messages": [{"role": "user", "content": "echo"}, {"role": "assistant", "content": word},
                                       {"role": "user", "content": "again"}, {"role": "assistant", "content": word[:3]}]})
        else:
            lines.append({"instruction": "Repeat", "input": word, "output": word})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


# LoRA, prefix tuning and bottleneck adapters together (dropout off, so any world size gives the same steps)
METHODS = {"prefix": {"enabled": True, "num_virtual_tokens": 3},
           "bottleneck": {"enabled": True, "adapter_size": 8, "dropout": 0.0},
           "run": {"export_methods": True}}

# frozen base in bf16, adapters in fp32, bf16 autocast
MIXED = {"model": {"dtype": "bfloat16"}, "precision": {"dtype": "bf16"}}


def tiny_config(out: Path, data_path: Path, **sections) -> Config:
    base = {
        "run": {"output_dir": str(out), "max_steps": 3, "progress": False, "plots": False, "seed": 0},
        "model": {"builder": "tiny_llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        "lora": {"r": 4, "lora_alpha": 8.0},
        "data": {"path": str(data_path), "max_length": 96},
        "batch": {"micro_batch_size": 2, "grad_accum": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "eval": {"at_end": False},
        "checkpoint": {"at_end": False},
        "parallel": {"mode": "ddp"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return replace(Config(), **base)


def trainable_state(trainer) -> dict:
    """Full (gathered) trainable parameters by name, on the CPU; every rank must call it."""
    from torch.distributed.tensor import DTensor

    from fastft.runtime.parallel import unwrap

    model = unwrap(trainer.model)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in model.named_parameters() if p.requires_grad}


@register_task("two_rates")
class TwoRates(CausalLMTask):
    """A task with parameter groups: lora_B at a tenth of optim.lr (every mode must keep the groups)."""

    def param_groups(self, model, params: list) -> list:
        names = {id(p): n for n, p in model.named_parameters()}
        slow = [p for p in params if "lora_B" in names[id(p)]]
        return [{"params": [p for p in params if "lora_B" not in names[id(p)]]},
                {"params": slow, "lr": self.cfg.optim.lr * 0.1}]
