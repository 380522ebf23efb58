"""RL fine-tuning with a KL penalty to a frozen reference: a rule reward (or a reward model) on a
generated arithmetic task, on-policy sampling.

    fastft train recipes/rlhf.toml                                   # GRPO
    fastft train recipes/rlhf.toml --recipe.options.algorithm=rloo   # KL folded into the reward
    fastft train recipes/ppo.toml                                    # PPO with a value head (+ reward model)

Every generation samples ``group_size`` completions per prompt from the policy and scores them: 1 when the
answer is right (``match = "exact_match"``: the completion is the answer alone; ``"final_answer"``: the last
number in it is the answer), plus ``format_reward`` times the fraction of digits in it (a shaping term
for untrained models). Per-token log-probs of the sampled tokens under the policy and the frozen
reference: with the kernel stack's loss on, ``fastft.rl.token_logprobs`` from the final hidden states and
the head weight (the fused linear cross-entropy: no [B, T, V] logits); off, the logits and a log-softmax
(see :func:`sampled_logprobs`). The per-token KL estimate comes from fastft.ops.kl_penalty (k1 or k3).

* ``grpo`` (Shao et al. 2024; TRL's GRPO loss): advantages are the rewards normalized within each
  prompt's group; per token ``-exp(logp - logp.detach()) * A + beta * KL_t``, averaged over each
  completion's tokens.
* ``rloo`` (the PPO-style shaping of Ziegler et al. 2019: the KL folded into the reward): each
  completion's return is ``reward - beta * sum_t KL_t`` (KL detached); its advantage is the return
  minus the mean return of the other completions of its prompt (a leave-one-out baseline, Ahmadian et
  al. 2024, in place of PPO's value network); per token ``-exp(logp - logp.detach()) * A``. One
  update per batch of samples, so the PPO ratio is 1 and its clipping never acts: it is left out.
* ``ppo`` (Schulman et al. 2017 as Ziegler et al. 2019 run it for language models): the policy (LoRA)
  carries a value head (``model.builder = "causal_lm_value_head"``: a :class:`ScalarHead` on the final
  hidden states, trained in full); per-token reward ``-kl_coef * KL_t`` plus the sequence's score at its
  last completion token (the reward model's score with ``reward_model = "<folder>"``, else the rule
  reward; ``normalize_scores``: standardised over the rollouts so far, ``missing_eos_penalty``: less for a
  completion cut before its EOS); GAE advantages and returns (``fastft.rl.gae``); the clipped policy and value losses
  (``fastft.rl.ppo_policy_loss``, ``value_loss``), ``policy + vf_coef * value``. A batch of rollouts is
  generated once and trained on for ``ppo_epochs`` runtime steps with its old log-probs and values, so
  the ratio moves away from 1 and the clipping acts. ``kl_target > 0``: the KL coefficient adapts
  (``fastft.rl.AdaptiveKLController``, its state saved in checkpoints).

The reference is the model as the builder returns it (a second copy, frozen); with LoRA on the policy
that is the pretrained model. Logged per step: reward, exact_match, final_answer, kl (the chosen
estimator, per token), completion_tokens, ended_in_eos; with ppo also rm_score (the reward model's raw
score), value_loss, value_explained_variance (of the rollout's returns by the values predicted before
training on it), policy_loss, clip_fraction, approx_kl, kl_coef. Eval: both matches of greedy answers to
held-out prompts.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastft import rl
from fastft.integrations.fused_head import HeadOperands, call_with_fused_head, fused_head_unsupported
from fastft.runtime import data as D
from fastft.runtime.config import ConfigError
from fastft.runtime.models import BUILDERS, build_model, register_model
from fastft.runtime.parallel import unwrap
from fastft.runtime.tasks import register_task
from fastft.runtime.trainer import Callback

from .common import (Monitor, RecipeTask, ScalarHead, StepStats, check_choice, pad,
                     recipe_options)

VALUE_HEAD_BUILDER = "causal_lm_value_head"


@dataclass(frozen=True)
class RLOptions:
    algorithm: str = "grpo"       # grpo | rloo | ppo
    group_size: int = 4           # completions sampled per prompt
    beta: float = 0.04            # KL coefficient (ppo: its initial value)
    kl_estimator: str = "k3"      # k1 | k3
    temperature: float = 1.0
    max_new_tokens: int = 6
    match: str = "exact_match"    # exact_match: the completion is the answer | final_answer: its last number is
    format_reward: float = 0.0    # times the fraction of the completion's characters that are digits
    # ppo only
    backbone: str = "hf"          # the builder of the causal LM the value head sits on (model.builder = causal_lm_value_head)
    reward_model: str = ""        # folder exported by the reward_model recipe; "": the rule reward
    ppo_epochs: int = 4           # runtime steps trained on one batch of rollouts
    clip_range: float = 0.2       # policy ratio clip
    value_clip_range: float = 0.2  # value clip around the old values; 0: unclipped squared error
    vf_coef: float = 0.1          # weight of the value loss
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # advantages to zero mean, unit variance over the batch's completion tokens
    kl_target: float = 0.0        # > 0: adaptive KL coefficient towards this KL per completion (summed over tokens)
    kl_horizon: int = 10000       # the adaptive controller's horizon, in completions
    value_head_lr: float = 0.0    # the value head's learning rate (0: optim.lr): it starts from zero, LoRA does not
    normalize_scores: bool = False  # scores to (score - mean) / std over every rollout so far (TRL's score norm)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a completion cut at max_new_tokens (TRL's)

    def validate(self) -> None:
        check_choice("algorithm", self.algorithm, ("grpo", "rloo", "ppo"))
        check_choice("kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_choice("match", self.match, ("exact_match", "final_answer"))
        if self.group_size < (1 if self.algorithm == "ppo" else 2):
            raise ConfigError(f"recipe.options.group_size must be >= 2 (advantages compare a group), got {self.group_size}")
        for key in ("temperature", "clip_range", "kl_horizon"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"recipe.options.{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("beta", "value_clip_range", "vf_coef", "kl_target", "value_head_lr", "missing_eos_penalty"):
            if getattr(self, key) < 0:
                raise ConfigError(f"recipe.options.{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("max_new_tokens", "ppo_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"recipe.options.{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"recipe.options.{key} must be in [0, 1], got {getattr(self, key)!r}")
        if self.backbone not in BUILDERS or self.backbone == VALUE_HEAD_BUILDER:
            known = ", ".join(b for b in BUILDERS if b != VALUE_HEAD_BUILDER)
            raise ConfigError(f"recipe.options.backbone = {self.backbone!r} is not a causal-LM builder; known: {known}")
        if self.algorithm != "ppo":
            changed = [k for k in ("reward_model", "ppo_epochs", "kl_target", "normalize_scores", "missing_eos_penalty")
                       if getattr(self, k) != getattr(RLOptions, k)]
            if changed:
                raise ConfigError(f"recipe.options.{changed[0]} is a ppo option; algorithm = {self.algorithm!r}")


class RunningMoments:
    """Mean and standard deviation of every value seen so far, updated a batch at a time (Chan et al. 1979's
    pairwise combination: no value is kept). Per process: under DDP each rank normalises by its own scores."""

    def __init__(self):
        self.count, self.mean, self.var = 0, 0.0, 0.0  # var: the population variance

    def update(self, values: Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta * delta * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The sample standard deviation (0 before two values were seen)."""
        return (self.var * self.count / (self.count - 1)) ** 0.5 if self.count > 1 else 0.0

    def normalize(self, values: Tensor) -> Tensor:
        """``(values - mean) / std``; only centred while every value seen was the same (std 0)."""
        std = self.std
        return (values - self.mean) / (std if std > 1e-6 else 1.0)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


@register_model(VALUE_HEAD_BUILDER)
def causal_lm_value_head(cfg):
    """The causal LM of ``recipe.options.backbone`` with ``value_head``: a :class:`ScalarHead` on its final
    hidden states that trains in full next to the run's methods (``train_with_methods``)."""
    options = recipe_options(RLOptions, cfg)
    model, tokenizer = BUILDERS[options.backbone](cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 4)
        model.value_head = ScalarHead(model.config.hidden_size, zero_init=True)
    model.train_with_methods = ("value_head",)
    return model, tokenizer


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


@D.register_generator("addition_questions")
def addition_questions(n: int, seed: int) -> list[dict]:
    """"Compute a + b." with one-digit a and b: the questions the reward model's pairs ask
    (fastft.recipes.reward_model), so the PPO samples it scores are in its format."""
    return D.addition_problems(n, seed, 0, 9, "Compute {a} + {b}.")


def completion_mask(completions: Tensor, eos_id: int) -> Tensor:
    """1 on every token up to and including the first EOS (all of them when there is none)."""
    is_eos = completions == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


def fused_logprobs_unsupported(cfg, model: nn.Module) -> str | None:
    """Why :func:`policy_pass` cannot compute ``model``'s log-probs from its head's operands (it then builds
    the logits), or None: the kernels are off, or the output layer is neither a plain ``nn.Linear`` nor a
    LoRA'd one (:func:`fastft.integrations.fused_head.fused_head_unsupported`). FSDP2-sharded heads, LoRA'd
    heads and logit transforms (soft cap, scaling) are fused."""
    if not cfg.kernels.stack.loss:
        return "kernels.loss is off (the stock comparison builds the logits)"
    return fused_head_unsupported(model)


def policy_pass(cfg, model: nn.Module, seqs: Tensor, mask: Tensor, prompt_len: int, temperature: float,
                hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """(log p(token) of every completion token of ``seqs`` ([N, T]) under ``model`` [N, C], and with
    ``hidden`` the final hidden states that predict those tokens [N, C, H]; else None).

    Fused: ``fastft.rl.token_logprobs`` runs inside the model's own forward, where its output layer is
    called (``call_with_fused_head``: DDP's and FSDP's hooks fire, an FSDP2-sharded head is whole, a LoRA'd
    head gives its widened operands), on the completion positions' hidden states: no [N, T, V] logits.
    Otherwise (:func:`fused_logprobs_unsupported` says why) the head builds the logits of the completion
    positions (``logits_to_keep``) and fastft's selective_log_softmax (torch's log_softmax + gather with the
    kernels off) reads them."""
    completions = seqs[:, prompt_len:]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens, as generate does
    if fused_logprobs_unsupported(cfg, model) is None:
        def completion_logprobs(head: HeadOperands):
            logp = rl.token_logprobs(head.input[:, prompt_len - 1:-1], head.weight, completions, bias=head.bias,
                                     temperature=temperature, softcap=head.softcap)
            return logp, head.hidden[:, prompt_len - 1:-1]

        logp, states = call_with_fused_head(model, completion_logprobs, input_ids=seqs, attention_mask=mask,
                                            position_ids=positions, use_cache=False)
        return logp, states if hidden else None
    out = model(input_ids=seqs, attention_mask=mask, position_ids=positions, use_cache=False,
                logits_to_keep=completions.shape[1] + 1, output_hidden_states=hidden)
    logits = out.logits[:, :-1]
    states = out.hidden_states[-1][:, prompt_len - 1:-1] if hidden else None
    if cfg.kernels.stack.loss:
        from fastft.ops import selective_log_softmax

        return selective_log_softmax(logits, completions, temperature=temperature), states
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1), states


def sampled_logprobs(cfg, model: nn.Module, seqs: Tensor, mask: Tensor, prompt_len: int, temperature: float) -> Tensor:
    """log p(token) of every completion token of ``seqs`` ([N, T]) under ``model`` (:func:`policy_pass`)."""
    return policy_pass(cfg, model, seqs, mask, prompt_len, temperature)[0]


def kl_estimate(cfg, logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate: fastft's kl_penalty op, or with the kernels off its pure-torch reference (the
    same estimator in eager torch ops, not a second hand-written copy)."""
    if cfg.kernels.stack.loss:
        from fastft.ops import kl_penalty

        return kl_penalty(logp, ref_logp, estimator=estimator)
    from fastft.reference.kl import kl_penalty as eager_kl_penalty

    return eager_kl_penalty(logp, ref_logp, estimator=estimator)


@register_task("rlhf")
class RLTask(RecipeTask):
    options_class = RLOptions
    metrics = {"exact_match": True, "final_answer": True}
    loss_unit = "sampled completion"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        train, held_out = D.load_records(cfg)
        self.answers: list[str] = []
        self.questions: list[str] = []
        self.train_samples = [self._sample(r) for r in train]
        self.eval_samples = [self._sample(r) for r in held_out]
        e = cfg.eval
        if not self.eval_samples and (e.at_start or e.at_end or e.every):
            raise ConfigError(f"no held-out prompt: every generated eval prompt of {cfg.data.generator!r} is also a "
                              f"training prompt; lower data.num_train (now {cfg.data.num_train})")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.stats = StepStats()
        o = self.options
        value_head = cfg.model.builder == VALUE_HEAD_BUILDER
        if o.algorithm == "ppo" and not value_head:
            raise ConfigError(f"model.builder = {cfg.model.builder!r}: algorithm = 'ppo' needs the policy's value "
                              f"head: model.builder = {VALUE_HEAD_BUILDER!r} (recipe.options.backbone = "
                              f"{cfg.model.builder!r})")
        with torch.random.fork_rng(devices=[]):
            # the reference: the backbone as its builder returns it (no value head)
            reference = BUILDERS[o.backbone](cfg)[0] if value_head else build_model(cfg)[0]
            self.reference = reference.eval().requires_grad_(False)
        self.kl_control = rl.AdaptiveKLController(o.beta, o.kl_target, o.kl_horizon) if o.kl_target > 0 else None
        self.kl_coef = o.beta
        self.score_moments = RunningMoments()
        self.reward_model = self.rm_tokenizer = None
        if o.reward_model:
            from .reward_model import load_reward_model

            self.reward_model, self.rm_tokenizer = load_reward_model(o.reward_model)
        self.rollouts: dict[int, dict] = {}  # micro-batch index within the step -> its rollout (ppo)
        self.step, self.micro = 0, 0

    def _sample(self, record: dict) -> dict:
        messages = D.record_messages(record, "rlhf")
        prompt = D.chat_token_ids(self.tokenizer, messages[:-1], True)
        self.answers.append(messages[-1]["content"].strip())
        self.questions.append(messages[-2]["content"])
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

    def _sample_completions(self, model: nn.Module, batch: dict) -> dict:
        """Samples ``group_size`` completions per prompt from the policy as it is (eval mode: no dropout) and
        scores them with the rule: {seqs, cmask, full_mask, prompt_len, index, reward, scores}."""
        o = self.options
        was_training = model.training
        model.eval()
        seqs, cmask = self._generate(model, batch, greedy=False, repeats=o.group_size)
        model.train(was_training)
        prompt_len = batch["input_ids"].shape[1]
        index = batch["index"].repeat_interleave(o.group_size)
        reward, scores = self.rewards(seqs[:, prompt_len:], cmask, index.cpu())
        full_mask = torch.cat([batch["attention_mask"].repeat_interleave(o.group_size, 0), cmask], 1)
        return {"seqs": seqs, "cmask": cmask, "full_mask": full_mask, "prompt_len": prompt_len, "index": index,
                "reward": reward.to(seqs.device), "scores": scores}

    def _reference_logprobs(self, sample: dict) -> Tensor:
        with torch.no_grad():
            self.reference.to(sample["seqs"].device)
            return sampled_logprobs(self.cfg, self.reference, sample["seqs"], sample["full_mask"], sample["prompt_len"],
                                    self.options.temperature)

    def _log_sample(self, sample: dict, kl: Tensor) -> None:
        m = sample["cmask"].to(kl.dtype)
        n = float(len(sample["reward"]))
        self.stats.add("reward", sample["reward"].sum().item(), n)
        for name, value in sample["scores"].items():
            self.stats.add(name, value.sum().item(), n)
        self.stats.add("kl", (kl.detach() * m).sum().item(), m.sum().item())
        self.stats.add("completion_tokens", m.sum().item(), n)
        completions = sample["seqs"][:, sample["prompt_len"]:]
        self.stats.add("ended_in_eos", (completions == self.eos_id).any(-1).sum().item(), n)

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        if self.options.algorithm == "ppo":
            return self.ppo_loss(model, batch, normalizer)
        o = self.options
        sample = self._sample_completions(model, batch)
        logp = sampled_logprobs(self.cfg, model, sample["seqs"], sample["full_mask"], sample["prompt_len"], o.temperature)
        ref_logp = self._reference_logprobs(sample)
        kl = kl_estimate(self.cfg, logp, ref_logp, o.kl_estimator)
        reward, m = sample["reward"], sample["cmask"].to(logp.dtype)
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
        self._log_sample(sample, kl)
        return per_sequence.sum() / normalizer

    # -- PPO --------------------------------------------------------------------------------------
    def policy_and_values(self, model: nn.Module, seqs: Tensor, full_mask: Tensor, prompt_len: int) -> tuple[Tensor, Tensor]:
        """Per completion token: the policy's log-prob of the sampled token and the value head's estimate
        of the state before it (both from one forward: the value head reads the same final hidden states)."""
        logp, hidden = policy_pass(self.cfg, model, seqs, full_mask, prompt_len, self.options.temperature, hidden=True)
        values = unwrap(model).value_head(hidden).squeeze(-1).float()
        return logp, values

    def sequence_scores(self, sample: dict) -> Tensor:
        """The score added at each completion's last token: the reward model's score of (question, completion)
        when one is loaded (the rule reward is still logged), else the rule reward."""
        if self.reward_model is None:
            return sample["reward"]
        from .reward_model import encode_texts, rm_text, score_batch

        prompt_len, cmask = sample["prompt_len"], sample["cmask"]
        completions = sample["seqs"][:, prompt_len:]
        texts = self.tokenizer.batch_decode(completions * cmask + self.pad_id * (1 - cmask), skip_special_tokens=True)
        questions = [self.questions[i] for i in sample["index"].tolist()]
        rows = encode_texts(self.rm_tokenizer, [rm_text(q, t.strip()) for q, t in zip(questions, texts)])
        device = completions.device
        self.reward_model.to(device)
        rm_pad = self.rm_tokenizer.pad_token_id
        with torch.no_grad():
            return score_batch(self.reward_model, rows, rm_pad, device).float()

    def shaped_scores(self, score: Tensor, sample: dict) -> Tensor:
        """The score the reward adds at the last token: with ``normalize_scores``, standardised by the mean and
        standard deviation of every score so far, this batch's included (a reward model's scores sit at an
        arbitrary offset, -11 for the shipped one: a zero-initialised value head would spend the run learning
        that offset, and until it does GAE's advantages carry it); minus ``missing_eos_penalty`` for each
        completion without an EOS (cut at max_new_tokens), in the units of the normalised score."""
        o = self.options
        if o.normalize_scores:
            self.score_moments.update(score)
            score = self.score_moments.normalize(score)
        if o.missing_eos_penalty:
            cut = ~(sample["seqs"][:, sample["prompt_len"]:] == self.eos_id).any(-1)
            score = score - o.missing_eos_penalty * cut.to(score.dtype)
        return score

    @torch.no_grad()
    def make_rollout(self, model: nn.Module, batch: dict) -> dict:
        """Samples, scores, and freezes what the next ``ppo_epochs`` steps train on: old log-probs and values
        (eval mode), per-token rewards ``-kl_coef * KL_t`` + the score at the last completion token, GAE."""
        o = self.options
        sample = self._sample_completions(model, batch)
        seqs, full_mask, prompt_len = sample["seqs"], sample["full_mask"], sample["prompt_len"]
        was_training = model.training
        model.eval()
        old_logp, old_values = self.policy_and_values(model, seqs, full_mask, prompt_len)
        model.train(was_training)
        ref_logp = self._reference_logprobs(sample)
        kl = kl_estimate(self.cfg, old_logp, ref_logp, o.kl_estimator)
        m = sample["cmask"].to(old_values.dtype)
        score = self.sequence_scores(sample)
        rewards = -self.kl_coef * kl * m
        last = (m.sum(-1) - 1).clamp_min(0).long()
        rewards[torch.arange(len(last), device=last.device), last] += self.shaped_scores(score, sample)
        advantages, returns = rl.gae(rewards, old_values, m, gamma=o.gamma, lam=o.lam)
        if o.whiten_advantages:
            mean = rl.masked_mean(advantages, m)
            var = rl.masked_mean((advantages - mean) ** 2, m)
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * m
        sequence_kl = (kl * m).sum(-1)
        rollout = {**sample, "old_logp": old_logp, "old_values": old_values, "advantages": advantages,
                   "returns": returns, "kl": kl, "score": score, "kl_coef": self.kl_coef,
                   # the value head's prediction on samples it has not trained on yet
                   "value_explained_variance": rl.explained_variance(old_values, returns, m)}
        if self.kl_control is not None:  # the next rollouts' coefficient, from the KL these were sampled at
            self.kl_coef = self.kl_control.update(float(sequence_kl.mean()), len(sequence_kl))
        return rollout

    def ppo_loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        """The clipped PPO loss of this micro-batch's rollout: fresh rollouts every ``ppo_epochs`` steps (or
        when there are none, e.g. after a resume), else the ones the earlier steps of the cycle trained on."""
        o = self.options
        key = self.micro
        self.micro += 1
        if self.step % o.ppo_epochs == 0 or key not in self.rollouts:
            self.rollouts[key] = self.make_rollout(model, batch)
        r = self.rollouts[key]
        m = r["cmask"]
        logp, values = self.policy_and_values(model, r["seqs"], r["full_mask"], r["prompt_len"])
        policy_loss, st = rl.ppo_policy_loss(logp, r["old_logp"], r["advantages"], m, clip_range=o.clip_range)
        vf = rl.value_loss(values, r["old_values"], r["returns"], m, clip_range=o.value_clip_range or None)
        n = float(len(r["reward"]))
        self._log_sample(r, r["kl"])
        if self.reward_model is not None:
            self.stats.add("rm_score", r["score"].sum().item(), n)
        for name, value in (("policy_loss", policy_loss.item()), ("value_loss", vf.item()),
                            ("clip_fraction", st.clip_fraction), ("approx_kl", st.approx_kl),
                            ("kl_coef", r["kl_coef"]), ("value_explained_variance", r["value_explained_variance"])):
            self.stats.add(name, value * n, n)
        # fastft.rl's losses are means over the micro-batch's completion tokens; weighted by its completions
        # so that micro-batches and ranks add up to the step's mean
        return (policy_loss + o.vf_coef * vf) * n / normalizer

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

    def param_groups(self, model: nn.Module, params: list):
        head = getattr(unwrap(model), "value_head", None)
        if head is None or not self.options.value_head_lr:
            return None
        ids = {id(p) for p in head.parameters()}
        return [{"params": [p for p in params if id(p) not in ids]},
                {"params": [p for p in params if id(p) in ids], "lr": self.options.value_head_lr}]

    def callbacks(self) -> list:
        return [Monitor(), RolloutSchedule()]


class RolloutSchedule(Callback):
    """Tells the task which step and micro-batch it is on (PPO reuses a step's rollouts, micro-batch by
    micro-batch, for ``ppo_epochs`` steps) and saves the KL coefficient in checkpoints (the adaptive
    controller's state: a resumed run goes on with the coefficient it had)."""

    def on_step_begin(self, trainer, step: int) -> None:
        trainer.task.step, trainer.task.micro = step, 0

    def state_dict(self, trainer) -> dict:
        return {"kl_coef": float(trainer.task.kl_coef), "score_moments": trainer.task.score_moments.state_dict()}

    def load_state_dict(self, trainer, state: dict) -> None:
        task = trainer.task
        task.kl_coef = float(state["kl_coef"])
        if "score_moments" in state:  # checkpoints written before score normalisation lack it
            task.score_moments.load_state_dict(state["score_moments"])
        if task.kl_control is not None:
            task.kl_control.load_state_dict({"coef": task.kl_coef})
