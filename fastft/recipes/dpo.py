"""DPO (Rafailov et al. 2023) on offline preference pairs whose preferred answer is checkable: "Compute a + b"
with the right sum chosen and a wrong sum rejected.

    fastft train recipes/dpo.toml
    fastft train recipes/dpo.toml --recipe.options.loss_type=ipo --recipe.options.beta=0.5

Batches are in TRL's DPOTrainer layout (its ``DataCollatorForPreference``): ``input_ids`` [2B, T] with the
B prompt+chosen rows first and the B prompt+rejected rows after, right-padded, an ``attention_mask`` and a
``completion_mask`` (1 on the answer tokens, EOS included). Each sequence's log-prob is the sum over its
completion tokens, for the policy and for the frozen reference. With ``kernels.stack.loss`` on, they come from
the decoder's final hidden states and the head weight through ``fastft.rl.token_logprobs`` (fused linear
cross-entropy, chunked: no [2B, T, V] logits); off, from the full logits with log_softmax + gather (the stock
computation). The loss is ``fastft.rl.dpo_loss`` (``loss_type`` sigmoid | hinge | ipo, ``beta``,
``label_smoothing``).

The reference is a second ``build_model`` copy, frozen, as in the RL recipe: fastft's tuners have no
"adapter off" switch (a handle can only be removed and re-applied), and a separate copy also serves a
full fine-tuning run and any method, at the price of one more set of base weights.

Logged per step: loss, chosen / rejected rewards (``beta * (policy - ref)`` summed log-probs), reward margin,
reward accuracy (chosen reward > rejected). Eval on held-out pairs: ``reward_accuracy`` (the policy's log-ratio
to the reference ranks the chosen answer higher; ties count half, so an untrained LoRA scores 0.5),
``preference_accuracy`` (the policy alone gives the chosen answer the higher log-prob) and ``exact_match``
(the greedy answer is the right sum, nothing else).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastft import rl
from fastft.integrations.fused_head import HeadOperands, call_with_fused_head
from fastft.runtime import data as D
from fastft.runtime.config import ConfigError
from fastft.runtime.models import build_model
from fastft.runtime.tasks import register_task

from .common import Monitor, RecipeTask, StepStats, check_choice, greedy_answers, pad


@dataclass(frozen=True)
class DPOOptions:
    beta: float = 0.1
    loss_type: str = "sigmoid"      # sigmoid | hinge | ipo
    label_smoothing: float = 0.0    # sigmoid only: the conservative DPO of Mitchell 2023
    max_new_tokens: int = 8         # greedy answer length at eval

    def validate(self) -> None:
        check_choice("loss_type", self.loss_type, rl.DPO_LOSS_TYPES)
        if not self.beta > 0:
            raise ConfigError(f"recipe.options.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"recipe.options.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("recipe.options.label_smoothing applies to loss_type = 'sigmoid' only")
        if self.max_new_tokens < 1:
            raise ConfigError(f"recipe.options.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@D.register_generator("addition_preferences")
def addition_preferences(n: int, seed: int) -> list[dict]:
    """"Compute a + b" on two-digit numbers: ``output`` the right sum (chosen), ``rejected`` a sum off by
    1 to 10 either way (a near miss, so the pair differs in the answer only)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-1, 1]) * rng.randint(1, 10)
        out.append({"instruction": f"Compute {a} + {b}. Answer with the number only.", "output": str(a + b),
                    "rejected": str(wrong)})
    return out


def preference_batch(samples: list[dict], pad_id: int) -> dict:
    """TRL's DataCollatorForPreference layout from ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` samples:
    [chosen rows; rejected rows], right-padded, with the completion mask."""
    rows = [s["prompt_ids"] + s["chosen_ids"] for s in samples] + [s["prompt_ids"] + s["rejected_ids"] for s in samples]
    completion = ([[0] * len(s["prompt_ids"]) + [1] * len(s["chosen_ids"]) for s in samples]
                  + [[0] * len(s["prompt_ids"]) + [1] * len(s["rejected_ids"]) for s in samples])
    return {"input_ids": pad(rows, pad_id), "attention_mask": pad([[1] * len(r) for r in rows], 0),
            "completion_mask": pad(completion, 0)}


def sequence_logprobs(cfg, model: nn.Module, batch: dict) -> Tensor:
    """Summed log-prob of each row's completion tokens [2B] under ``model`` (position t predicts token t+1)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = ids[:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    if cfg.kernels.stack.loss:
        # inside the model's forward (call_with_fused_head: FSDP2-sharded and LoRA'd heads too); the head runs
        # on the completion positions only (as TRL's fused head): prompts and padding cost no GEMM
        counted = targets != -100
        rows = counted.nonzero()[:, 0]

        def completion_logprobs(head: HeadOperands) -> Tensor:
            return rl.token_logprobs(head.input[:, :-1][counted], head.weight, targets[counted], bias=head.bias,
                                     softcap=head.softcap)

        logp = call_with_fused_head(model, completion_logprobs, input_ids=ids, attention_mask=mask, use_cache=False)
        return torch.zeros(ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != -100)).sum(-1)


def dpo_terms(cfg, options: DPOOptions, model: nn.Module, reference: nn.Module, batch: dict):
    """(mean loss, chosen rewards [B], rejected rewards [B]) of one preference batch."""
    policy = sequence_logprobs(cfg, model, batch)
    with torch.no_grad():
        ref = sequence_logprobs(cfg, reference, batch)
    tokens = batch["completion_mask"].sum(-1).to(policy.dtype)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    tc, tr = tokens.chunk(2)
    return rl.dpo_loss(pc, pr, rc, rr, beta=options.beta, loss_type=options.loss_type,
                       label_smoothing=options.label_smoothing, chosen_tokens=tc, rejected_tokens=tr)


@register_task("dpo")
class DPOTask(RecipeTask):
    options_class = DPOOptions
    metrics = {"reward_accuracy": True, "preference_accuracy": True, "exact_match": True}
    loss_unit = "preference pair"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        train, held_out = D.load_records(cfg)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.train_samples = [self._sample(r, i) for i, r in enumerate(train)]
        self.eval_samples = [self._sample(r, i) for i, r in enumerate(held_out)]
        e = cfg.eval
        if not self.eval_samples and (e.at_start or e.at_end or e.every):
            raise ConfigError(f"no held-out pair: every generated eval pair of {cfg.data.generator!r} is also a "
                              f"training pair; lower data.num_train (now {cfg.data.num_train})")
        self.stats = StepStats()
        with torch.random.fork_rng(devices=[]):
            self.reference = build_model(cfg)[0].eval().requires_grad_(False)

    def _sample(self, record: dict, index: int) -> dict:
        if "rejected" not in record:
            raise ConfigError(f"data record {index} has no 'rejected' answer: the DPO recipe needs preference pairs "
                              "(instruction, output = chosen, rejected)")
        messages = D.record_messages(record, "dpo")
        prompt = D.chat_token_ids(self.tokenizer, messages[:-1], True)

        def answer(text: str) -> list:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

        return {"prompt_ids": prompt, "chosen_ids": answer(messages[-1]["content"]),
                "rejected_ids": answer(str(record["rejected"])), "answer": messages[-1]["content"].strip()}

    def collate(self, samples: list) -> dict:
        return preference_batch(samples, self.pad_id)

    def count(self, batch: dict) -> Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        self.reference.to(batch["input_ids"].device)
        loss, chosen, rejected = dpo_terms(self.cfg, self.options, model, self.reference, batch)
        n = float(len(chosen))
        self.stats.add("rewards_chosen", chosen.sum().item(), n)
        self.stats.add("rewards_rejected", rejected.sum().item(), n)
        self.stats.add("reward_margin", (chosen - rejected).sum().item(), n)
        self.stats.add("reward_accuracy", (chosen > rejected).float().sum().item(), n)
        return loss * n / normalizer

    @torch.no_grad()
    def evaluate(self, model: nn.Module, d) -> dict:
        size = self.cfg.eval.batch_size
        was_training = model.training
        model.eval()
        self.reference.to(d.device)
        totals = {"reward_accuracy": 0.0, "preference_accuracy": 0.0, "exact_match": 0.0}
        for start in range(0, len(self.eval_samples), size):
            chunk = self.eval_samples[start:start + size]
            batch = {k: v.to(d.device) for k, v in self.collate(chunk).items()}
            policy = sequence_logprobs(self.cfg, model, batch)
            ratio = policy - sequence_logprobs(self.cfg, self.reference, batch)
            rc, rr = ratio.chunk(2)
            pc, pr = policy.chunk(2)
            totals["reward_accuracy"] += ((rc > rr).float() + 0.5 * (rc == rr).float()).sum().item()
            totals["preference_accuracy"] += (pc > pr).float().sum().item()
            answers = greedy_answers(model, self.tokenizer, [s["prompt_ids"] for s in chunk], self.options.max_new_tokens,
                                     d.device)
            totals["exact_match"] += sum(a == s["answer"] for a, s in zip(answers, chunk))
        model.train(was_training)
        return {k: v / max(1, len(self.eval_samples)) for k, v in totals.items()}

    def callbacks(self) -> list:
        return [Monitor()]
