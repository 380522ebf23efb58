"""Tiny config-built runs of the recipes (every recipe test trains a few dozen steps in seconds)."""
from __future__ import annotations

from fastft.runtime.config import Config, replace
from fastft.runtime.trainer import Trainer

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def tiny_config(out, module: str, task: str, builder: str, options: dict, **sections) -> Config:
    base = {
        "run": {"output_dir": str(out), "max_steps": 20, "progress": False, "plots": False, "resume": False,
                "export_methods": False, "seed": 0},
        "model": {"builder": builder, **TINY_MODEL},
        "lora": {"enabled": False},
        "data": {"task": task, "generator": "generated", "num_train": 400, "num_eval": 100, "max_length": 96},
        "batch": {"micro_batch_size": 16},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "eval": {"at_start": True, "at_end": True, "batch_size": 100},
        "checkpoint": {"at_end": False},
        "recipe": {"module": module, "options": options},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return replace(Config(), **base)


def fit(cfg) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg)
    return trainer, trainer.fit()

