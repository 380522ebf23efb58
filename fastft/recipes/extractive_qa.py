"""Extractive question answering: start / end span heads over the context tokens, exact match and F1.

    fastft train recipes/extractive_qa.toml

Data: :func:`fastft.recipes.generators.qa`: contexts of ``facts_per_context`` facts about different
people and a question about one of them; the answer is a span of the context. Input: ``[CLS]
question [SEP] context [SEP]``; the span head gives a start and an end logit per token, positions
outside the context are masked. Loss per example: the mean of the start and end cross-entropies over
the positions (one fastft.ops.cross_entropy call for both heads), summed over the step's examples and
divided by their count. Prediction: the best-scoring span with start <= end < start + max_answer_tokens,
mapped back to context words. Metrics: exact match and token F1 as SQuAD defines them (Rajpurkar et
al. 2016; the answers here are lower-case words, so no further normalization applies).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastft.runtime.config import ConfigError
from fastft.runtime.models import register_model
from fastft.runtime.tasks import register_task

from . import generators
from .common import EncoderTask, cross_entropy, encoder_with_heads, predict, recipe_options

MASKED = -1e4  # a logit no position outside the context can win with (finite: no inf - inf in the softmax)


@dataclass(frozen=True)
class QAOptions:
    facts_per_context: int = 3
    max_answer_tokens: int = 8

    def validate(self) -> None:
        if self.facts_per_context < 1 or self.max_answer_tokens < 1:
            raise ConfigError("recipe.options.facts_per_context and max_answer_tokens must be >= 1")


def span_model(cfg, options_class):
    recipe_options(options_class, cfg)  # bad options fail before the encoder loads
    return encoder_with_heads(cfg, {"span": (2, "token")}, 0.1)


@register_model("span_encoder")
def span_encoder(cfg):
    return span_model(cfg, QAOptions)


def squad_scores(predicted: str, answer: str) -> tuple[float, float]:
    """(exact match, token F1) of one prediction, as in SQuAD's evaluation script."""
    p, a = predicted.split(), answer.split()
    common = sum((Counter(p) & Counter(a)).values())
    if common == 0:
        return float(p == a), 0.0
    precision, recall = common / len(p), common / len(a)
    return float(p == a), 2 * precision * recall / (precision + recall)


def best_span(start: Tensor, end: Tensor, max_tokens: int) -> tuple[int, int]:
    """argmax of start[i] + end[j] over i <= j < i + max_tokens."""
    scores = start[:, None] + end[None, :]
    n = scores.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    scores = scores.masked_fill((j < i) | (j >= i + max_tokens), float("-inf"))
    flat = int(scores.argmax())
    return flat // n, flat % n


@register_task("extractive_qa")
class ExtractiveQATask(EncoderTask):
    metrics = {"loss": False, "exact_match": True, "f1": True}
    options_class = QAOptions

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.train_samples, self.eval_samples = self.generate(self.options.facts_per_context)

    def generate(self, facts_per_context: int) -> tuple[list, list]:
        """(train, eval) samples of contexts with ``facts_per_context`` facts (disjoint seeds)."""
        data, seed = self.cfg.data, self.cfg.run.seed + 7919 * facts_per_context
        return (self.samples(generators.qa(data.num_train, seed, facts_per_context)),
                self.samples(generators.qa(data.num_eval, seed + 1_000_003, facts_per_context)))

    def samples(self, records: list) -> list:
        return [s for s in map(self.sample, records) if s is not None]

    def sample(self, record: dict):
        enc = self.tokenizer(record["question"], record["context"], is_split_into_words=True, truncation="only_second",
                             max_length=self.cfg.data.max_length)
        words, sequences = enc.word_ids(), enc.sequence_ids()
        in_context = [int(s == 1) for s in sequences]
        tokens = [t for t, (w, s) in enumerate(zip(words, sequences)) if s == 1 and w == record["answer_start"]]
        if not tokens:  # the answer was truncated away
            return None
        sample = {"input_ids": enc["input_ids"], "context_mask": in_context, "start": tokens[0], "end": tokens[-1],
                  "context_words": [w if s == 1 else -1 for w, s in zip(words, sequences)],
                  "context": " ".join(record["context"]), "answer": record["answer"]}
        if "token_type_ids" in enc:
            sample["token_type_ids"] = enc["token_type_ids"]
        return sample

    def collate(self, samples: list) -> dict:
        keep = [{k: v for k, v in s.items() if k not in ("context", "answer")} for s in samples]
        return super().collate(keep)

    @staticmethod
    def span_logits(out: dict, batch: dict) -> Tensor:
        """[2, B, T]: start and end logits, positions outside the context masked."""
        logits = out["span"].permute(2, 0, 1)
        return logits.masked_fill(batch["context_mask"][None] != 1, MASKED)

    def _per_example(self, out: dict, batch: dict) -> Tensor:
        logits = self.span_logits(out, batch)
        targets = torch.stack([batch["start"], batch["end"]])
        return cross_entropy(self.cfg, logits, targets, reduction="none").reshape(2, -1).mean(0)

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        return self._per_example(self.forward(model, batch), batch).sum() / normalizer

    def evaluate(self, model: nn.Module, d) -> dict:
        outputs = predict(model, self, self.eval_samples, d.device)
        loss = sum(self._per_example(o["logits"], o["batch"]).sum().item() for o in outputs) / len(self.eval_samples)
        em = f1 = 0.0
        position = 0
        for o in outputs:
            logits = self.span_logits(o["logits"], o["batch"])
            for b in range(logits.shape[1]):
                sample = self.eval_samples[position]
                position += 1
                i, j = best_span(logits[0, b], logits[1, b], self.options.max_answer_tokens)
                words = sample["context"].split()
                first, last = sample["context_words"][i], sample["context_words"][j]
                predicted = " ".join(words[first:last + 1]) if first >= 0 and last >= first else ""
                e, f = squad_scores(predicted, sample["answer"])
                em, f1 = em + e, f1 + f
        n = len(self.eval_samples)
        return {"loss": loss, "exact_match": em / n, "f1": f1 / n}
