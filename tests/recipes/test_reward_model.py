"""Reward model recipe: the Bradley–Terry loss on scores gathered by hand, the score head outside LoRA's
"all-linear", held-out pairwise accuracy rising on a tiny model, the export loading back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastft.recipes.common import ScalarHead
from fastft.recipes.reward_model import RewardTask, load_reward_model, score_batch
from fastft.runtime.config import ConfigError, load_config
from fastft.runtime.parallel import unwrap
from fastft.runtime.trainer import Trainer
from recipe_helpers import fit, tiny_config

MODULE = "fastft.recipes.reward_model"


def config(tmp_path, options=None, **sections):
    opts = {"backbone": "tiny_llama", "export": "", **(options or {})}
    cfg = tiny_config(tmp_path, MODULE, "reward_model", "reward_model", opts,
                      **{"data": {"generator": "arithmetic_preferences", "num_train": 200, "num_eval": 300,
                                  "max_length": 40},
                         "lora": {"enabled": True, "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                         "optim": {"lr": 3e-3}, **sections})
    return cfg


def test_loss_is_bradley_terry_on_last_token_scores(tmp_path):
    """The task's loss == -logsigmoid(s_c - s_r) mean, with each score = w . h[last non-pad token] + b
    computed by hand from the decoder's hidden states."""
    trainer = Trainer(config(tmp_path, run={"max_steps": 1}))
    model, task = unwrap(trainer.model), trainer.task
    batch = task.collate(task.train_samples[:5])
    n = torch.tensor(5.0)
    with torch.no_grad():
        ours = task.loss(model, batch, n)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].sum(-1) - 1  # right padding
        h = hidden[torch.arange(10), last]
        scores = h @ model.score.weight[0] + model.score.bias[0]
        theirs = -F.logsigmoid(scores[:5] - scores[5:]).mean()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_lora_leaves_the_score_head_whole_and_trains_it(tmp_path):
    trainer = Trainer(config(tmp_path, run={"max_steps": 1}))
    model = unwrap(trainer.model)
    assert type(model.score) is ScalarHead
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"score.weight", "score.bias"} <= trained
    assert any("lora" in n for n in trained)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n and "score" not in n)


def test_pairwise_accuracy_rises_and_the_export_loads_back(tmp_path):
    trainer, summary = fit(config(tmp_path, {"export": "rm"}, run={"max_steps": 40},
                                  eval={"at_start": True, "at_end": True, "batch_size": 100}))
    before, after = summary["eval_start"]["pairwise_accuracy"], summary["eval_end"]["pairwise_accuracy"]
    assert after >= before + 0.15 and after >= 0.75, (before, after)
    rm, tokenizer = load_reward_model(str(tmp_path / "rm"))
    task: RewardTask = trainer.task
    rows = [s["chosen"] for s in task.eval_samples[:4]]
    model = unwrap(trainer.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(score_batch(rm, rows, task.pad_id, "cpu"),
                                   score_batch(model, rows, task.pad_id, "cpu"), atol=1e-4, rtol=1e-4)


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="backbone"):
        Trainer(config(tmp_path, {"backbone": "nope"}))
    with pytest.raises(ConfigError, match="reward_mode"):
        Trainer(config(tmp_path, {"reward_mode": 1}))


def test_the_shipped_recipe_loads():
    cfg = load_config("recipes/reward_model.toml", [])
    assert cfg.data.task == "reward_model" and cfg.model.builder == "reward_model"
