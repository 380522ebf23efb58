"""Tasks: what a run trains on and how it is scored (data, loss, eval metric).

A task prepares its samples from the config and the tokenizer, says how many loss units (tokens) a
micro-batch holds, returns the micro-batch's summed loss divided by the step's normalizer, and
evaluates. ``register_task(name)`` adds one; ``data.task`` picks it. The trainer owns everything
else (order, sharding, normalization across accumulation and ranks, optimizer, checkpoints).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import data as D
from .config import ConfigError

TASKS: dict[str, Callable] = {}


def register_task(name: str):
    def add(cls):
        TASKS[name] = cls
        return cls
    return add


def import_recipe(cfg) -> None:
    """Imports ``recipe.module``, which registers the recipe's task, model builder and callbacks."""
    name = cfg.recipe.module
    if not name:
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise ConfigError(f"recipe.module {name!r} cannot be imported: {exc}") from None
        raise


def build_task(cfg, tokenizer):
    if cfg.data.task not in TASKS:
        raise ConfigError(f"data.task {cfg.data.task!r} is unknown; known: {', '.join(TASKS)}")
    return TASKS[cfg.data.task](cfg, tokenizer)


class Task:
    """Interface. ``metrics`` maps each eval metric to True when greater is better; ``loss_unit`` names
    what ``count`` counts (the train loss is per one of them: curves and logs say so)."""

    metrics: dict = {}
    loss_unit: str = "loss unit"

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_samples: list = []

    def collate(self, samples: list) -> dict:
        raise NotImplementedError

    def count(self, batch: dict) -> Tensor:
        """Loss units of the micro-batch (counted before the forward)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        """Summed loss of the micro-batch divided by ``normalizer``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, d) -> dict:
        """Metrics over the eval set; every rank calls it and gets the same numbers."""
        return {}

    def callbacks(self) -> list:
        """Callbacks the task adds to the run (schedules, extra loss terms, observers)."""
        return []

    def param_groups(self, model: nn.Module, params: list) -> Optional[list]:
        """Optimizer parameter groups over ``params`` (dicts, each may set its own ``lr``), or None: one group."""
        return None


@register_task("causal_lm")
class CausalLMTask(Task):
    """Instruction / chat data, next-token loss on the responses. Metrics: ``loss`` (per response
    token) and, with ``eval.generate``, ``exact_match`` (greedy answer == reference, stripped)."""

    loss_unit = "response token"

    metrics = {"loss": False, "exact_match": True}

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        train, held_out = D.load_records(cfg)
        n = cfg.data.max_length
        self.train_examples = D.tokenize_records(tokenizer, train, n, cfg.data.path or cfg.data.generator)
        self.train_samples = D.as_samples(self.train_examples, n, cfg.data.packing)
        self.eval_examples = D.tokenize_records(tokenizer, held_out, n, cfg.data.eval_path or "eval") if held_out else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(self, samples: list) -> dict:
        return D.collate(samples, self.pad_id)

    def count(self, batch: dict) -> Tensor:
        return (batch["labels"][:, 1:] != D.IGNORE_INDEX).sum()

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        return model(**batch, use_cache=False, num_items_in_batch=normalizer).loss

    def _rank_slice(self, items: list, d) -> tuple[list, int]:
        """This rank's share and the batch count every rank runs (FSDP needs equal call counts)."""
        mine = items[d.rank::d.world]
        per_rank = math.ceil(len(items) / d.world)
        return mine, math.ceil(per_rank / self.cfg.eval.batch_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, d) -> dict:
        from .parallel import all_reduce_sum

        if not self.eval_examples:
            return {}
        was_training = model.training
        model.eval()
        device = d.device
        bs = self.cfg.eval.batch_size
        mine, batches = self._rank_slice(self.eval_examples, d)
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, tokens, correct, answered
        for i in range(batches):
            chunk = mine[i * bs:(i + 1) * bs] or self.eval_examples[:1]  # a dummy batch keeps ranks in step
            real = bool(mine[i * bs:(i + 1) * bs])
            batch = {k: v.to(device) for k, v in self.collate([{"input_ids": e.input_ids, "labels": e.labels}
                                                              for e in chunk]).items()}
            out = model(**batch, use_cache=False, num_items_in_batch=torch.ones((), device=device))
            if real:
                totals[0] += out.loss.double()
                totals[1] += self.count(batch).double()
            if self.cfg.eval.generate:
                correct = self._exact_match(model, chunk, d)
                if real:
                    totals[2] += correct
                    totals[3] += len(chunk)
        all_reduce_sum(totals, d)
        model.train(was_training)
        metrics = {"loss": float(totals[0] / totals[1].clamp_min(1))}
        if self.cfg.eval.generate:
            metrics["exact_match"] = float(totals[2] / totals[3].clamp_min(1))
        return metrics

    def _exact_match(self, model: nn.Module, examples: list, d) -> int:
        from .parallel import unwrap

        prompts = [e.prompt for e in examples]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues every prompt at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = unwrap(model).generate(input_ids=ids.to(d.device), attention_mask=mask.to(d.device), do_sample=False,
                                     max_new_tokens=self.cfg.eval.max_new_tokens, pad_token_id=self.pad_id,
                                     synced_gpus=d.active and d.world > 1)
        answers = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return sum(a.strip() == e.answer.strip() for a, e in zip(answers, examples))
