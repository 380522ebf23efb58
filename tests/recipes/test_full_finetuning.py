"""Full fine-tuning recipe: every weight trains through the fused loss head, layer-wise learning rates,
gradual unfreezing from the top."""
from __future__ import annotations

import pytest
import torch

from fastft.runtime.config import ConfigError, load_config
from fastft.runtime.parallel import unwrap
from fastft.runtime.trainer import Trainer
from recipe_helpers import fit, tiny_config

MODULE = "fastft.recipes.full_finetuning"


def config(tmp_path, options=None, **sections):
    return tiny_config(tmp_path, MODULE, "full_finetuning", "tiny_llama", options or {},
                       **{"data": {"generator": "addition", "num_train": 200, "num_eval": 40}, "batch": {"micro_batch_size": 8},
                          **sections})


def test_every_weight_trains_and_eval_loss_drops(tmp_path):
    """20 steps from random init: held-out response loss at most 60% of its start."""
    trainer, summary = fit(config(tmp_path, {"layer_lr_decay": 0.8}))
    assert summary["eval_end"]["loss"] <= 0.6 * summary["eval_start"]["loss"], summary
    model = unwrap(trainer.model)
    assert all(p.requires_grad for p in model.parameters())
    assert summary["kernels"]["loss"]


def test_layer_wise_learning_rates(tmp_path):
    trainer = Trainer(config(tmp_path, {"layer_lr_decay": 0.5}, optim={"lr": 1e-2, "schedule": "constant"}))
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == pytest.approx({"head": 1e-2, "block.1": 5e-3, "block.0": 2.5e-3, "embeddings": 1.25e-3})
    grouped = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    assert grouped == len(list(unwrap(trainer.model).parameters()))


def test_gradual_unfreezing_keeps_lower_layers_until_their_turn(tmp_path):
    """unfreeze_every=2 on 2 blocks: head from step 0, block.1 from 2, block.0 from 4, embeddings from 6."""
    trainer = Trainer(config(tmp_path, {"unfreeze_every": 2}, run={"max_steps": 4},
                             eval={"at_start": False, "at_end": False}))
    model = unwrap(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("lm_head") for n in changed)
    assert any(".layers.1." in n for n in changed)
    assert not any(".layers.0." in n or "embed_tokens" in n for n in changed), sorted(changed)
    assert [r["unfrozen_groups"] for r in trainer.history] == [1, 1, 2, 2]


def test_lora_must_be_off(tmp_path):
    with pytest.raises(ConfigError, match="lora.enabled = false"):
        Trainer(config(tmp_path, lora={"enabled": True}))
    with pytest.raises(ConfigError, match="layer_lr_decay"):
        Trainer(config(tmp_path, {"layer_lr_decay": 1.5}))


def test_the_shipped_recipe_loads():
    cfg = load_config("recipes/full_finetuning.toml")
    assert cfg.data.task == "full_finetuning" and not cfg.lora.enabled
