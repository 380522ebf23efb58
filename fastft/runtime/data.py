"""Instruction data: JSONL records -> token ids with the loss on the response only, packing, batches.

A record is ``{"instruction", "input"?, "output"}`` (one user turn, one answer) or
``{"messages": [{"role", "content"}, ...]}``; both go through the tokenizer's chat template. Labels
are -100 everywhere but on the assistant turns. The data order is a pure function of (seed, step):
step s takes global positions [s*G, (s+1)*G) of an epoch-wise permutation seeded by (seed, epoch), and
rank r's micro-batch m takes its slice of them, so a resumed run (or another world size) sees the same
examples at the same step.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad training data (the message names the file and line)."""


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


def record_messages(record: dict, where: str) -> list[dict]:
    """The chat messages of one record (instruction format converted to one user + one assistant turn)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: every message needs a string 'role' and 'content', got {m!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message to train on")
        return messages
    if "instruction" in record and "output" in record:
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise DataError(f"{where}: a record needs 'messages' or 'instruction' + 'output'; it has {sorted(record)}")


def read_jsonl(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path!r} does not exist")
    records = []
    with p.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            record_messages(record, f"{path}:{number}")
            records.append(record)
    if not records:
        raise DataError(f"data file {path!r} has no records")
    return records


# ------------------------------------------------------------------------------------------------
# Generated tasks with exact answers
# ------------------------------------------------------------------------------------------------


# data.generator name -> fn(n, seed) -> n records; recipes add theirs with register_generator
GENERATORS: dict[str, Callable[[int, int], list[dict]]] = {}


def register_generator(name: str):
    """Decorator: ``fn(n, seed) -> list of n records`` becomes ``data.generator = name``. A second function
    under a name already taken is a ValueError (the same function again, e.g. its module imported twice, is not)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_generator: the name must be a non-empty string, got {name!r}")

    def where(fn) -> tuple:
        return getattr(fn, "__module__", None), getattr(fn, "__qualname__", repr(fn))

    def add(fn):
        if name in GENERATORS and where(GENERATORS[name]) != where(fn):
            raise ValueError(f"data generator {name!r} is already registered ({GENERATORS[name].__qualname__})")
        GENERATORS[name] = fn
        return fn
    return add


def addition_problems(n: int, seed: int, low: int, high: int,
                      instruction: str = "Compute {a} + {b}. Answer with the number only.") -> list[dict]:
    """``n`` records "Compute a + b" with a and b drawn from [low, high]; the output is the sum alone. Recipes
    build their own arithmetic generators on it (other ranges, other wording)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        out.append({"instruction": instruction.format(a=a, b=b), "output": str(a + b)})
    return out


@register_generator("addition")
def addition_records(n: int, seed: int) -> list[dict]:
    """"Compute a + b" on two-digit numbers; the answer is the number alone."""
    return addition_problems(n, seed, 10, 99)


def load_records(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) records per the data config: files, or a generator (train and eval disjoint seeds)."""
    data = cfg.data
    if data.generator:
        if data.generator not in GENERATORS:
            raise DataError(f"data.generator {data.generator!r} is unknown; known: {', '.join(GENERATORS)}")
        make = GENERATORS[data.generator]
        train = make(data.num_train, cfg.run.seed)
        seen = {json.dumps(r, sort_keys=True) for r in train}
        held_out = [r for r in make(data.num_eval * 4, cfg.run.seed + 1_000_003) if json.dumps(r, sort_keys=True) not in seen]
        return train, held_out[: data.num_eval]
    train = read_jsonl(data.path)
    return train, (read_jsonl(data.eval_path) if data.eval_path else [])


# ------------------------------------------------------------------------------------------------
# Tokenization
# ------------------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list
    labels: list
    prompt: Optional[list] = None   # the ids up to the last assistant turn (generation-based eval)
    answer: Optional[str] = None


def chat_token_ids(tokenizer, messages: list, generation_prompt: bool) -> list:
    """The token ids of ``messages`` in the tokenizer's chat template (with the assistant's opening when
    ``generation_prompt``), as a list whatever transformers' version returns."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def tokenize(tokenizer, messages: list, max_length: int, where: str) -> Example:
    """Token ids of the conversation; labels on the assistant turns only. Each turn's span is found by
    templating the conversation up to it, which needs the template to be prefix-stable (ChatML is)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; instruction data needs one")
    full = chat_token_ids(tokenizer, messages, False)
    labels = [IGNORE_INDEX] * len(full)
    prompt = None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(chat_token_ids(tokenizer, messages[:i], True))
        end = len(chat_token_ids(tokenizer, messages[: i + 1], False))
        if chat_token_ids(tokenizer, messages[:i], True) != full[:start]:
            raise DataError(f"{where}: the chat template is not prefix-stable; cannot find the assistant turn")
        labels[start:end] = full[start:end]
        prompt = full[:start]
    example = Example(full[:max_length], labels[:max_length], prompt, messages[-1]["content"]
                      if messages[-1]["role"] == "assistant" else None)
    return example


def tokenize_records(tokenizer, records: list, max_length: int, name: str) -> list[Example]:
    out = []
    for i, record in enumerate(records):
        ex = tokenize(tokenizer, record_messages(record, f"{name}[{i}]"), max_length, f"{name}[{i}]")
        if sum(l != IGNORE_INDEX for l in ex.labels[1:]) > 0:
            out.append(ex)
    if not out:
        raise DataError(f"{name}: no example keeps a response token within data.max_length")
    return out


def pack(examples: list[Example], max_length: int) -> list[dict]:
    """Greedy packing in order; each pack restarts position ids at every example, so attention (with
    transformers' packed-sequence masks) and rotary positions stay per example."""
    packs, ids, labels, positions = [], [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            packs.append({"input_ids": ids, "labels": labels, "position_ids": positions})
            ids, labels, positions = [], [], []
        ids = ids + ex.input_ids
        labels = labels + [IGNORE_INDEX] + ex.labels[1:]  # never predict across an example boundary
        positions = positions + list(range(len(ex.input_ids)))
    if ids:
        packs.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packs


def as_samples(examples: list[Example], max_length: int, packing: bool) -> list[dict]:
    if packing:
        return pack(examples, max_length)
    return [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded tensors. Packed samples carry position ids and no attention mask: transformers then
    builds a block-causal mask per example from the restarts of the position ids (with no KV cache in
    the forward: the task passes use_cache=False). A packed row's padding restarts its positions too,
    so it forms a block of its own that no real token attends to."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    if "position_ids" not in samples[0]:
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["position_ids"])
        positions[i, :n] = torch.tensor(s["position_ids"])
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


# ------------------------------------------------------------------------------------------------
# Order
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> tuple:
    return tuple(torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


def global_indices(num_samples: int, seed: int, step: int, global_batch: int) -> list[int]:
    """Sample indices of optimizer step ``step``: a pure function of (seed, step)."""
    out = []
    for position in range(step * global_batch, (step + 1) * global_batch):
        epoch, offset = divmod(position, num_samples)
        out.append(_epoch_order(num_samples, seed, epoch)[offset])
    return out


def step_micro_batches(samples: list, seed: int, step: int, micro_batch: int, grad_accum: int, rank: int,
                       world: int) -> Iterator[list]:
    """This rank's micro-batches of step ``step`` (``grad_accum`` lists of ``micro_batch`` samples)."""
    indices = global_indices(len(samples), seed, step, micro_batch * grad_accum * world)
    for m in range(grad_accum):
        start = (m * world + rank) * micro_batch
        yield [samples[i] for i in indices[start:start + micro_batch]]
