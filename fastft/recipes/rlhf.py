"""RL fine-tuning with a KL penalty to a frozen reference: a rule reward on a generated arithmetic task,
on-policy sampling every step.

    fastft train recipes/rlhf.toml                                   # GRPO
    fastft train recipes/rlhf.toml --recipe.options.algorithm=rloo   # KL folded into the reward

Every step samples ``group_size`` completions per prompt from the policy and scores them: 1 when the
answer is right (``match = "exact_match"``: the completion is the answer alone; ``"final_answer"``: the last
number in it is the answer), plus ``format_reward`` times the fraction of digits in it (a shaping term
for untrained models). Per-token log-probs of the sampled tokens under the policy and the frozen
reference come from fastft.ops.selective_log_softmax (no [B, T, V] log-softmax), the per-token KL
estimate from fastft.ops.kl_penalty (k1 or k3).

* ``grpo`` (Shao et al. 2024; TRL's GRPO loss): advantages are the rewards normalized within each
  prompt's group; per token ``-exp(logp - logp.detach()) * A + beta * KL_t``, averaged over each
  completion's tokens.
* ``rloo`` (the PPO-style shaping of Ziegler et al. 2019: the KL folded into the reward): each
  completion's return is ``reward - beta * sum_t KL_t`` (KL detached); its advantage is the return
  minus the mean return of the other completions of its prompt (a leave-one-out baseline, Ahmadian et
  al. 2024, in place of PPO's value network); per token ``-exp(logp - logp.detach()) * A``. One
  update per batch of samples, so the PPO ratio is 1 and its clipping never acts: it is left out.

The reference is the model as the builder returns it (a second copy, frozen); with LoRA on the policy
that is the pretrained model. Logged per step: reward, exact_match, final_answer, kl (the chosen
estimator, per token), completion_tokens. Eval: both matches of greedy answers to held-out prompts.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastft.runtime import data as D
from fastft.runtime.config import ConfigError
from fastft.runtime.models import build_model
from fastft.runtime.parallel import unwrap
from fastft.runtime.tasks import Task, register_task

from .common import Monitor, StepStats, check_choice, pad, recipe_options


@dataclass(frozen=True)
class RLOptions:
    algorithm: str = "grpo"       # grpo | rloo
    group_size: int = 4           # completions sampled per prompt
    beta: float = 0.04            # KL coefficient
    kl_estimator: str = "k3"      # k1 | k3
    temperature: float = 1.0
    max_new_tokens: int = 6
    match: str = "exact_match"    # exact_match: the completion is the answer | final_answer: its last number is
    format_reward: float = 0.0    # times the fraction of the completion's characters that are digits

    def validate(self) -> None:
        check_choice("algorithm", self.algorithm, ("grpo", "rloo"))
        check_choice("kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_choice("match", self.match, ("exact_match", "final_answer"))
        if self.group_size < 2:
            raise ConfigError(f"recipe.options.group_size must be >= 2 (advantages compare a group), got {self.group_size}")
        if self.temperature <= 0 or self.max_new_tokens < 1 or self.beta < 0:
            raise ConfigError("recipe.options: temperature must be > 0, max_new_tokens >= 1 and beta >= 0")


@D.register_generator("single_digit_addition")
def single_digit_addition(n: int, seed: int) -> list[dict]:
    """"Compute a + b" with a one-digit answer: a task an untrained tiny model can stumble on (tests)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a)
        out.append({"instruction": f"Compute {a} + {b}. Answer with the number only.", "output": str(a + b)})
    return out


def completion_mask(completions: Tensor, eos_id: int) -> Tensor:
    """1 on every token up to and including the first EOS (all of them when there is none)."""
    is_eos = completions == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


def sampled_logprobs(cfg, model: nn.Module, seqs: Tensor, mask: Tensor, prompt_len: int, temperature: float) -> Tensor:
    """log p(token) of every completion token of ``seqs`` ([N, T]) under ``model``: the head runs on the
    completion positions only (``logits_to_keep``), then fastft's selective_log_softmax."""
    completions = seqs[:, prompt_len:]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens, as generate does
    logits = model(input_ids=seqs, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=completions.shape[1] + 1).logits[:, :-1]
    if cfg.kernels.stack.loss:
        from fastft.ops import selective_log_softmax

        return selective_log_softmax(logits, completions, temperature=temperature)
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)


def kl_estimate(cfg, logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate: fastft's kl_penalty op, or with the kernels off its pure-torch reference (the
    same estimator in eager torch ops, not a second hand-written copy)."""
    if cfg.kernels.stack.loss:
        from fastft.ops import kl_penalty

        return kl_penalty(logp, ref_logp, estimator=estimator)
    from fastft.reference.kl import kl_penalty as eager_kl_penalty

    return eager_kl_penalty(logp, ref_logp, estimator=estimator)


@register_task("rlhf")
class RLTask(Task):
    metrics = {"exact_match": True, "final_answer": True}
    loss_unit = "sampled completion"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.options = recipe_options(RLOptions, cfg)
        train, held_out = D.load_records(cfg)
        self.answers: list[str] = []
        self.train_samples = [self._sample(r) for r in train]
        self.eval_samples = [self._sample(r) for r in held_out]
        e = cfg.eval
        if not self.eval_samples and (e.at_start or e.at_end or e.every):
            raise ConfigError(f"no held-out prompt: every generated eval prompt of {cfg.data.generator!r} is also a "
                              f"training prompt; lower data.num_train (now {cfg.data.num_train})")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.stats = StepStats()
        with torch.random.fork_rng(devices=[]):
            self.reference = build_model(cfg)[0].eval().requires_grad_(False)

    def _sample(self, record: dict) -> dict:
        messages = D.record_messages(record, "rlhf")
        prompt = D.chat_token_ids(self.tokenizer, messages[:-1], True)
        self.answers.append(messages[-1]["content"].strip())
        return {"input_ids": prompt, "index": len(self.answers) - 1}

    def collate(self, samples: list) -> dict:
        width = max(len(s["input_ids"]) for s in samples)
        rows = [[self.pad_id] * (width - len(s["input_ids"])) + s["input_ids"] for s in samples]  # left padding
        mask = [[0] * (width - len(s["input_ids"])) + [1] * len(s["input_ids"]) for s in samples]
        return {"input_ids": pad(rows, self.pad_id), "attention_mask": pad(mask, 0),
                "index": torch.tensor([s["index"] for s in samples])}

    def count(self, batch: dict) -> Tensor:
        return torch.tensor(batch["input_ids"].shape[0] * self.options.group_size)

    @torch.no_grad()
    def _generate(self, model: nn.Module, batch: dict, greedy: bool, repeats: int) -> tuple[Tensor, Tensor]:
        o = self.options
        ids = batch["input_ids"].repeat_interleave(repeats, 0)
        mask = batch["attention_mask"].repeat_interleave(repeats, 0)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": o.temperature, "top_k": 0,
                                                       "top_p": 1.0}
        seqs = unwrap(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=o.max_new_tokens,
                                      pad_token_id=self.pad_id, eos_token_id=self.eos_id, **sampling)
        completions = seqs[:, ids.shape[1]:]
        return seqs, completion_mask(completions, self.eos_id)

    def rewards(self, completions: Tensor, cmask: Tensor, index: Tensor) -> tuple[Tensor, dict]:
        """(reward, {"exact_match", "final_answer"}) per completion: the completion is the answer alone, or
        the last number in it is the answer."""
        texts = self.tokenizer.batch_decode(completions * cmask + self.pad_id * (1 - cmask), skip_special_tokens=True)
        answers = [self.answers[i] for i in index.tolist()]
        scores = {"exact_match": torch.tensor([float(t.strip() == a) for t, a in zip(texts, answers)]),
                  "final_answer": torch.tensor([float(re.findall(r"-?\d+", t)[-1:] == [a]) for t, a in zip(texts, answers)])}
        digits = torch.tensor([sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts])
        return scores[self.options.match] + self.options.format_reward * digits, scores

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        o = self.options
        was_training = model.training
        model.eval()  # sampling from the policy as it is (no dropout)
        seqs, cmask = self._generate(model, batch, greedy=False, repeats=o.group_size)
        model.train(was_training)
        prompt_len = batch["input_ids"].shape[1]
        index = batch["index"].repeat_interleave(o.group_size)
        reward, scores = self.rewards(seqs[:, prompt_len:], cmask, index.cpu())
        reward = reward.to(seqs.device)
        full_mask = torch.cat([batch["attention_mask"].repeat_interleave(o.group_size, 0), cmask], 1)
        logp = sampled_logprobs(self.cfg, model, seqs, full_mask, prompt_len, o.temperature)
        with torch.no_grad():
            self.reference.to(seqs.device)
            ref_logp = sampled_logprobs(self.cfg, self.reference, seqs, full_mask, prompt_len, o.temperature)
        kl = kl_estimate(self.cfg, logp, ref_logp, o.kl_estimator)
        m = cmask.to(logp.dtype)
        tokens = m.sum(-1).clamp_min(1)
        groups = reward.view(-1, o.group_size)
        ratio = torch.exp(logp - logp.detach())  # 1, carrying the policy gradient
        if o.algorithm == "grpo":
            advantage = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
            per_token = -ratio * advantage[:, None] + o.beta * kl
        else:
            returns = (reward - o.beta * (kl.detach() * m).sum(-1)).view(-1, o.group_size)
            baseline = (returns.sum(1, keepdim=True) - returns) / (o.group_size - 1)
            advantage = (returns - baseline).view(-1)
            per_token = -ratio * advantage[:, None]
        per_sequence = (per_token * m).sum(-1) / tokens
        n = float(len(reward))
        self.stats.add("reward", reward.sum().item(), n)
        for name, value in scores.items():
            self.stats.add(name, value.sum().item(), n)
        self.stats.add("kl", (kl.detach() * m).sum().item(), m.sum().item())
        self.stats.add("completion_tokens", m.sum().item(), n)
        return per_sequence.sum() / normalizer

    def evaluate(self, model: nn.Module, d) -> dict:
        size = self.cfg.eval.batch_size
        correct = {"exact_match": 0.0, "final_answer": 0.0}
        was_training = model.training
        model.eval()
        for start in range(0, len(self.eval_samples), size):
            batch = {k: v.to(d.device) for k, v in self.collate(self.eval_samples[start:start + size]).items()}
            seqs, cmask = self._generate(model, batch, greedy=True, repeats=1)
            scores = self.rewards(seqs[:, batch["input_ids"].shape[1]:], cmask, batch["index"].cpu())[1]
            for name, value in scores.items():
                correct[name] += value.sum().item()
        model.train(was_training)
        return {name: value / max(1, len(self.eval_samples)) for name, value in correct.items()}

    def callbacks(self) -> list:
        return [Monitor()]
