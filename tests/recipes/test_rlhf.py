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


# ------------------------------------------------------------------------------------------------
# Fused log-probs, PPO with a value head
# ------------------------------------------------------------------------------------------------

def ppo_config(tmp_path, options=None, **sections):
    opts = {"algorithm": "ppo", "backbone": "tiny_llama", "group_size": 2, "max_new_tokens": 3, "ppo_epochs": 2,
            **(options or {})}
    return config(tmp_path, opts, model={"builder": "causal_lm_value_head"}, **sections)


@pytest.mark.parametrize("lora_head", [False, True], ids=["plain_head", "lora_head"])
def test_fused_logprobs_equal_the_logits_path(tmp_path, lora_head):
    """kernels.loss on: token_logprobs inside the model's forward from its head's operands (no logits; a
    LoRA'd head gives its widened operands); off: the logits path. Same log-probs, hidden states and
    gradients of every trainable parameter."""
    from fastft.recipes.rlhf import fused_logprobs_unsupported, policy_pass
    from fastft.runtime.config import replace

    lora = {"enabled": True, "r": 4, "target_modules": ["lm_head", "q_proj"]} if lora_head else {}
    cfg = config(tmp_path, run={"max_steps": 1}, **({"lora": lora} if lora else {}))
    trainer = Trainer(cfg)
    model, task = unwrap(trainer.model), trainer.task
    if lora_head:
        assert type(model.lm_head).__name__ != "Linear"
        with torch.no_grad():  # B starts at 0: make the LoRA branch count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    assert fused_logprobs_unsupported(cfg, model) is None
    off = replace(cfg, kernels={"loss": False})
    assert "kernels.loss" in fused_logprobs_unsupported(off, model)
    batch = task.collate(task.train_samples[:3])
    seqs, cmask = task._generate(model, batch, greedy=False, repeats=2)
    mask = torch.cat([batch["attention_mask"].repeat_interleave(2, 0), cmask], 1)
    prompt_len = batch["input_ids"].shape[1]
    trained = [p for p in model.parameters() if p.requires_grad]
    results = []
    for c in (cfg, off):
        model.zero_grad()
        logp, hidden = policy_pass(c, model, seqs, mask, prompt_len, 0.8, hidden=True)
        (logp * cmask).sum().backward()
        results.append((logp.detach(), hidden.detach(), *[p.grad.clone() for p in trained]))
    assert len(results[0]) > 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _plain_gae(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(values)
    for i in range(values.shape[0]):
        n = int(mask[i].sum())
        running = 0.0
        for t in reversed(range(n)):
            nxt = values[i, t + 1] if t + 1 < n else 0.0
            delta = rewards[i, t] + gamma * nxt - values[i, t]
            running = delta + gamma * lam * running
            adv[i, t] = running
    return adv, (adv + values) * mask


@pytest.mark.parametrize("value_clip", [0.2, 0.0], ids=["value_clipped", "value_unclipped"])
def test_ppo_loss_on_a_fixed_rollout_matches_plain_torch(tmp_path, value_clip):
    """Everything recomputed by hand from the rollout's sampled tokens: log-probs from full logits, values
    from the last hidden state, k3 KL to the reference, per-token rewards with the score at the last
    token, GAE, whitening, the clipped policy loss and the value loss (clipped, or plain as the shipped
    recipe's value_clip_range = 0)."""
    trainer = Trainer(ppo_config(tmp_path, {"vf_coef": 0.5, "clip_range": 0.1, "lam": 0.9, "gamma": 0.95,
                                            "value_clip_range": value_clip}, run={"max_steps": 1}))
    model, task, o = unwrap(trainer.model), trainer.task, trainer.task.options
    batch = task.collate(task.train_samples[:4])
    trainer.train_step(0)  # the policy leaves the reference (KL > 0) and its values leave 0
    task.sequence_scores = lambda sample: torch.linspace(-1.0, 2.0, len(sample["reward"]))  # distinct scores
    r = task.make_rollout(model, batch)
    seqs, mask, p = r["seqs"], r["full_mask"], r["prompt_len"]
    m = r["cmask"].double()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)

    def logp_and_values(net):
        out = net(input_ids=seqs, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[:, p - 1:-1].double() / o.temperature, -1)
        logp = logp.gather(-1, seqs[:, p:, None]).squeeze(-1)
        h = out.hidden_states[-1][:, p - 1:-1].double()
        values = h @ net.value_head.weight[0].double() + net.value_head.bias[0].double() if net is model else None
        return logp, values

    with torch.no_grad():
        model.eval()
        old_logp, old_values = logp_and_values(model)
        ref_logp, _ = logp_and_values(task.reference)
        model.train()
    kl = torch.exp(ref_logp - old_logp) - (ref_logp - old_logp) - 1
    rewards = -o.beta * kl * m
    for i in range(len(m)):
        rewards[i, int(m[i].sum()) - 1] += r["score"][i]
    adv, ret = _plain_gae(rewards, old_values * m, m, o.gamma, o.lam)
    mean = (adv * m).sum() / m.sum()
    std = (((adv - mean) ** 2 * m).sum() / m.sum()).sqrt()
    adv = (adv - mean) / std * m
    torch.testing.assert_close(r["advantages"].double(), adv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r["returns"].double(), ret, atol=1e-4, rtol=1e-4)

    # one optimizer step moves the policy; the loss of the reused rollout then has ratios != 1
    task.step, task.micro, task.rollouts = 0, 0, {}
    trainer.train_step(0)
    assert task.rollouts[0] is not r
    task.step, task.micro, task.rollouts = 1, 0, {0: r}
    n = torch.tensor(float(len(m)))
    ours = task.ppo_loss(model, batch, n)
    logp, values = logp_and_values(model)
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - o.clip_range, 1 + o.clip_range))
    pg = (pg * m).sum() / m.sum()
    error = (values - ret) ** 2
    if value_clip:
        v_clip = old_values + (values - old_values).clamp(-value_clip, value_clip)
        error = torch.maximum(error, (v_clip - ret) ** 2)
    vf = 0.5 * (error * m).sum() / m.sum()
    torch.testing.assert_close(ours.double(), (pg + o.vf_coef * vf).detach(), atol=1e-4, rtol=1e-4)


def test_ppo_epochs_reuse_rollouts_and_clipping_acts(tmp_path, monkeypatch):
    """ppo_epochs = 3 over 6 steps: two generations; the first step of a cycle has ratio 1 (no clipping),
    the reused ones clip; value loss, its explained variance, approx_kl and kl_coef are logged."""
    trainer = Trainer(ppo_config(tmp_path, {"ppo_epochs": 3}, run={"max_steps": 6}, optim={"lr": 3e-2}))
    calls = []
    original = trainer.task._generate
    monkeypatch.setattr(trainer.task, "_generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer.fit()
    h = trainer.history
    assert len(calls) == 2, len(calls)
    assert h[0]["clip_fraction"] == 0.0 and h[3]["clip_fraction"] == 0.0
    assert max(h[1]["clip_fraction"], h[2]["clip_fraction"]) > 0, [r["clip_fraction"] for r in h]
    assert all(k in h[0] for k in ("value_loss", "approx_kl", "kl_coef", "kl", "reward", "policy_loss"))
    assert h[1]["reward"] == h[0]["reward"]  # the same rollouts
    ev = [r["value_explained_variance"] for r in h]
    assert ev[0] == ev[1] == ev[2] and ev[3] == ev[4] == ev[5] and all(v <= 1.0 for v in ev), ev  # one per rollout


@pytest.mark.parametrize("offset,normalize", [(0.0, False), (-10.0, True)])
def test_ppo_raises_the_rule_reward(tmp_path, offset, normalize):
    """30 steps of the recipe's PPO (value head, GAE, whitening, clipping, KL in the reward) on a rule reward
    (the digits' share of a 4-token completion + the right sum): the mean reward of the last 5 steps beats
    the first 5 by >= 0.2, the KL stays finite. A reward offset of -10 (what a reward model's scores look
    like to a zero-initialised value head) is undone by normalize_scores; without it the same run went
    0.02 -> 0.11 only (0.02 -> 0.29 with no offset, 0.02 -> 0.39 normalised)."""
    trainer = Trainer(ppo_config(tmp_path, {"group_size": 4, "max_new_tokens": 4, "normalize_scores": normalize},
                                 run={"max_steps": 30}))
    rule_scores = trainer.task.sequence_scores
    trainer.task.sequence_scores = lambda sample: rule_scores(sample) + offset
    trainer.fit()
    h = trainer.history
    first, last = _mean(h, "reward", lambda x: x[:5]), _mean(h, "reward", lambda x: x[-5:])
    assert last >= first + 0.2, [round(r["reward"], 3) for r in h]
    assert all(r["kl"] == r["kl"] and abs(r["kl"]) < 10 for r in h), [r["kl"] for r in h]
    assert max(r["clip_fraction"] for r in h) > 0


def test_running_moments_equal_the_moments_of_everything_seen():
    from fastft.recipes.rlhf import RunningMoments

    batches = [torch.randn(5, dtype=torch.float64) * 3 - 11, torch.randn(1, dtype=torch.float64), torch.randn(8)]
    moments = RunningMoments()
    assert moments.std == 0.0
    torch.testing.assert_close(moments.normalize(torch.tensor([2.0])), torch.tensor([2.0]))  # nothing seen: as is
    for b in batches:
        moments.update(b)
    seen = torch.cat([b.double() for b in batches])
    assert moments.count == 14
    assert abs(moments.mean - seen.mean().item()) < 1e-12 and abs(moments.std - seen.std().item()) < 1e-12
    x = torch.tensor([-11.0, 0.0])
    torch.testing.assert_close(moments.normalize(x), (x - seen.mean().float()) / seen.std().float())
    copy = RunningMoments()
    copy.load_state_dict(moments.state_dict())
    assert copy.state_dict() == moments.state_dict()
    same = RunningMoments()
    same.update(torch.full((4,), 3.0))  # std 0: centred, not divided by 0
    assert same.normalize(torch.tensor([3.0, 5.0])).tolist() == [0.0, 2.0]


def test_shaped_scores_normalise_and_penalise_completions_without_eos(tmp_path):
    trainer = Trainer(ppo_config(tmp_path, {"normalize_scores": True, "missing_eos_penalty": 0.5},
                                 run={"max_steps": 1}))
    task = trainer.task
    eos = task.eos_id
    other = (eos + 1) % 50
    seqs = torch.tensor([[9, other, eos], [9, other, other], [9, eos, eos], [9, other, other]])
    score = torch.tensor([-12.0, -10.0, -11.0, -11.0])
    shaped = task.shaped_scores(score, {"seqs": seqs, "prompt_len": 1})
    normalised = (score - score.mean()) / score.std()
    torch.testing.assert_close(shaped, normalised - 0.5 * torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert task.score_moments.count == 4


def test_adaptive_kl_coefficient_moves_and_is_checkpointed(tmp_path):
    from fastft.recipes.rlhf import RolloutSchedule

    trainer = Trainer(ppo_config(tmp_path, {"kl_target": 1e-4, "kl_horizon": 10, "ppo_epochs": 1,
                                            "normalize_scores": True},
                                 run={"max_steps": 3}, optim={"lr": 3e-2}))
    trainer.fit()
    task = trainer.task
    assert task.kl_coef != task.options.beta
    assert task.score_moments.count == 3 * 8 * 2  # every rollout's scores: 3 steps of 8 prompts x 2 samples
    cb = next(c for c in trainer.callbacks if isinstance(c, RolloutSchedule))
    state = cb.state_dict(trainer)
    moments = dict(state["score_moments"])
    task.kl_coef = task.kl_control.coef = 123.0
    task.score_moments.load_state_dict({"count": 0, "mean": 0.0, "var": 0.0})
    cb.load_state_dict(trainer, state)
    assert task.kl_coef == state["kl_coef"] == task.kl_control.coef
    assert task.score_moments.state_dict() == moments
    cb.load_state_dict(trainer, {"kl_coef": 1.0})  # a checkpoint from before score normalisation


def test_ppo_scores_with_an_exported_reward_model(tmp_path):
    from fastft.recipes.reward_model import export_reward_model, reward_model

    rm_cfg = tiny_config(tmp_path / "rm", "fastft.recipes.reward_model", "reward_model", "reward_model",
                         {"backbone": "tiny_llama"})
    rm, tok = reward_model(rm_cfg)
    folder = export_reward_model(rm, tok, tmp_path / "rm" / "export")
    trainer = Trainer(ppo_config(tmp_path / "ppo", {"reward_model": str(folder)}, run={"max_steps": 2}))
    trainer.fit()
    assert all("rm_score" in r and r["rm_score"] == r["rm_score"] for r in trainer.history)


def test_bad_ppo_options(tmp_path):
    with pytest.raises(ConfigError, match="model.builder"):
        Trainer(config(tmp_path, {"algorithm": "ppo"}))
    for key, value in (("ppo_epochs", 0), ("clip_range", 0.0), ("lam", 1.5), ("vf_coef", -1.0), ("backbone", "nope")):
        with pytest.raises(ConfigError, match=key):
            Trainer(ppo_config(tmp_path, {key: value}))
    with pytest.raises(ConfigError, match="kl_target"):
        Trainer(config(tmp_path, {"kl_target": 1.0}))
    with pytest.raises(ConfigError, match="normalize_scores"):
        Trainer(config(tmp_path, {"normalize_scores": True}))
    with pytest.raises(ConfigError, match="missing_eos_penalty"):
        Trainer(ppo_config(tmp_path, {"missing_eos_penalty": -1.0}))
    with pytest.raises(ValueError, match="no_such_folder"):
        Trainer(ppo_config(tmp_path, {"reward_model": str(tmp_path / "no_such_folder")}))


def test_the_shipped_ppo_recipe_loads():
    cfg = load_config("recipes/ppo.toml", [])
    assert cfg.recipe.options["algorithm"] == "ppo" and cfg.model.builder == "causal_lm_value_head"
