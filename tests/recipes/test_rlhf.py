"""RL recipe (GRPO and the KL-in-reward variant): reward rises on a generated arithmetic task, the KL to
the frozen reference is measured with fastft's ops, the pieces match their definitions."""
from __future__ import annotations

import pytest
import torch

from fastft.recipes.rlhf import completion_mask, kl_estimate, sampled_logprobs
from fastft.runtime.config import ConfigError, load_config
from fastft.runtime.parallel import unwrap
from fastft.runtime.trainer import Trainer
from recipe_helpers import fit, tiny_config

MODULE = "fastft.recipes.rlhf"


def config(tmp_path, options=None, **sections):
    opts = {"format_reward": 0.5, "max_new_tokens": 1, "group_size": 4, "beta": 0.04, **(options or {})}
    return tiny_config(tmp_path, MODULE, "rlhf", "tiny_llama", opts,
                       **{"data": {"generator": "single_digit_addition", "num_train": 200, "num_eval": 20},
                          "batch": {"micro_batch_size": 8}, "eval": {"at_start": False, "at_end": False}, **sections})


def _mean(history, key, steps):
    return sum(r[key] for r in steps(history)) / len(steps(history))


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_reward_rises_from_random_init(tmp_path, algorithm):
    """30 steps: the mean reward of the last 5 steps beats the first 5 by >= 0.2; the KL stays finite and
    below max reward / beta (the KL of the best KL-regularized policy cannot exceed it)."""
    trainer, _ = fit(config(tmp_path, {"algorithm": algorithm}, run={"max_steps": 30}))
    h = trainer.history
    first, last = _mean(h, "reward", lambda x: x[:5]), _mean(h, "reward", lambda x: x[-5:])
    assert last >= first + 0.2, [round(r["reward"], 3) for r in h]
    kl = [r["kl"] for r in h]
    assert all(k == k and k < 1.5 / 0.04 for k in kl), kl


def test_logprobs_and_kl_match_plain_torch(tmp_path):
    """selective_log_softmax over the completion positions == log_softmax + gather over the full logits;
    kl_penalty k1 / k3 == their formulas."""
    trainer = Trainer(config(tmp_path, run={"max_steps": 1}))
    model, task = unwrap(trainer.model), trainer.task
    batch = task.collate(task.train_samples[:3])
    seqs, cmask = task._generate(model, batch, greedy=False, repeats=2)
    mask = torch.cat([batch["attention_mask"].repeat_interleave(2, 0), cmask], 1)
    prompt_len = batch["input_ids"].shape[1]
    with torch.no_grad():
        ours = sampled_logprobs(trainer.cfg, model, seqs, mask, prompt_len, 0.7)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=seqs, attention_mask=mask, position_ids=positions).logits
        full = torch.log_softmax(logits[:, prompt_len - 1:-1] / 0.7, -1)
        theirs = full.gather(-1, seqs[:, prompt_len:, None]).squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(kl_estimate(trainer.cfg, a, b, "k1"), a - b)
    torch.testing.assert_close(kl_estimate(trainer.cfg, a, b, "k3"), torch.exp(b - a) - (b - a) - 1)


def test_completion_mask_stops_after_the_first_eos():
    eos = 7
    completions = torch.tensor([[1, 7, 3, 7], [1, 2, 3, 4], [7, 1, 1, 1]])
    assert completion_mask(completions, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        Trainer(config(tmp_path, {"group_size": 1}))
    with pytest.raises(ConfigError, match="kl_estimator"):
        Trainer(config(tmp_path, {"kl_estimator": "k2"}))
    with pytest.raises(ConfigError, match="no held-out prompt"):  # 55 one-digit sums, all drawn for training
        Trainer(config(tmp_path, data={"generator": "single_digit_addition", "num_train": 2000}, eval={"at_end": True}))


def test_the_shipped_recipe_loads():
    cfg = load_config("recipes/rlhf.toml", ["--recipe.options.algorithm=rloo"])
    assert cfg.data.task == "rlhf" and cfg.recipe.options["algorithm"] == "rloo"
