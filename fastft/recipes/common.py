"""What every recipe shares, written once: typed recipe options, encoders with task heads, scikit-learn
metrics, per-step statistics in the JSONL log, and PNG curves of every logged metric.

The runtime already gives the rest: the task / model-builder registries, the loop, exact loss
normalization, early stopping (``eval.early_stopping_patience``) and ``metrics.jsonl``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from fastft.runtime.config import ConfigError, section_from_table
from fastft.runtime.models import ModelLoadError, resolve_path
from fastft.runtime.parallel import all_reduce_sum, unwrap
from fastft.runtime.tasks import Task
from fastft.runtime.trainer import Callback

from . import generators


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


# options the encoder recipes had before bottleneck adapters became a runtime section
MOVED_OPTIONS = {"adapters": '[bottleneck] enabled = true ("none": enabled = false)',
                 "adapter_size": "[bottleneck] adapter_size", "placement": "[bottleneck] placement"}


def recipe_options(cls, cfg):
    """The recipe's options dataclass ``cls`` from ``[recipe.options]``: an unknown key or a wrong type is
    a ConfigError naming it (and the valid keys), like every other config key."""
    table = cfg.recipe.options
    if not isinstance(table, dict):
        raise ConfigError(f"recipe.options must be a table of keys, got {table!r}")
    for key in table:
        if key in MOVED_OPTIONS:
            raise ConfigError(f"recipe.options.{key} moved to the run's [bottleneck] section: {MOVED_OPTIONS[key]}")
    options = section_from_table(cls, table, "recipe.options", context=f" for recipe {cfg.recipe.module!r}")
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return options


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"recipe.options.{key} = {value!r} is not one of {', '.join(map(str, choices))}")


# ------------------------------------------------------------------------------------------------
# Encoders with task heads
# ------------------------------------------------------------------------------------------------


def word_tokenizer(words: list[str]):
    """A BERT-style word-level tokenizer ([CLS] a [SEP] b [SEP]) over a closed vocabulary: config-built
    encoders read the generated sentences word by word, without any file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def model_folder(path: str) -> str:
    """``model.path`` as a folder: "package:<name>[/sub/folder]" is a folder inside an installed package
    (found without importing it), anything else is used as it is."""
    if path.startswith("package:") and "/" in path:
        package, _, sub = path.partition("/")
        folder = os.path.join(resolve_path(package), sub)
        if not os.path.isdir(folder):
            raise ModelLoadError(f"model.path {path!r}: no folder {folder!r}")
        return folder
    return resolve_path(path)


def build_encoder(cfg) -> tuple[nn.Module, object]:
    """(encoder, tokenizer). ``model.path`` set: a pretrained Hugging Face encoder (AutoModel) and its
    tokenizer; empty: a config-built BERT with ``model.hidden_size`` / ``num_layers`` / ``num_heads`` /
    ``intermediate_size`` (random init from run.seed) and the word tokenizer of the generators."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    m = cfg.model
    if m.path:
        folder = model_folder(m.path)
        try:
            return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        except OSError as exc:
            raise ModelLoadError(f"cannot load an encoder from {folder!r}: {exc}") from None
    tokenizer = word_tokenizer(generators.vocabulary())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                        num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                        max_position_embeddings=512, hidden_dropout_prob=m.dropout,
                        attention_probs_dropout_prob=m.dropout, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return BertModel(config, add_pooling_layer=False), tokenizer


class EncoderWithHeads(nn.Module):
    """An encoder and named linear heads. ``heads`` maps a name to (outputs, level): level "sequence"
    reads the mask-weighted mean of the last hidden states, "token" every position. ``forward`` returns
    ``{name: logits}`` ([B, outputs] or [B, T, outputs])."""

    # new task heads: they train along with the run's parameter-efficient methods (fastft.runtime.models)
    train_with_methods = ("heads",)

    def __init__(self, encoder: nn.Module, heads: dict, dropout: float = 0.1):
        super().__init__()
        for name, (outputs, level) in heads.items():
            if level not in ("sequence", "token"):
                raise ValueError(f"head {name!r}: level must be 'sequence' or 'token', got {level!r}")
        self.encoder = encoder
        self.levels = {name: level for name, (_, level) in heads.items()}
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, outputs) for name, (outputs, _) in heads.items()})
        self.dropout = nn.Dropout(dropout)

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> dict:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.dropout(self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state)
        out = {}
        for name, head in self.heads.items():
            if self.levels[name] == "sequence":
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                out[name] = head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
            else:
                out[name] = head(hidden)
        return out


class ScalarHead(nn.Module):
    """``hidden @ weight.T + bias`` -> [..., 1]: a reward model's score or a policy's value head. Its own
    parameters rather than an nn.Linear, so LoRA's ``"all-linear"`` (fastft's and PEFT's: every nn.Linear
    but the output layer) never wraps it: the head trains in full, through ``train_with_methods``."""

    def __init__(self, hidden_size: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size))
        self.bias = nn.Parameter(torch.zeros(1))
        if not zero_init:  # a value head starts at 0 (zero_init); a score head needs distinct scores to rank
            nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def forward(self, hidden: Tensor) -> Tensor:
        return nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


def last_token_hidden(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, H]: each row's hidden state at its last non-pad token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * (positions + 1)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def encoder_with_heads(cfg, heads: dict, head_dropout: float) -> tuple[nn.Module, object]:
    """The encoder of :func:`build_encoder` with ``heads``. Bottleneck adapters (or LoRA) come from the
    run's ``[bottleneck]`` (``[lora]``) section like for any model; the heads train with them
    (``EncoderWithHeads.train_with_methods``), and with no method every weight trains."""
    encoder, tokenizer = build_encoder(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 2)  # the same heads on every rank
        model = EncoderWithHeads(encoder, heads, head_dropout)
    return model, tokenizer


class RecipeTask(Task):
    """A recipe's task: its typed options (``options_class``, a dataclass) are read from ``[recipe.options]``
    and checked (``recipe_options``) as the task is built, into ``self.options``."""

    options_class = None

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        if self.options_class is not None:
            self.options = recipe_options(self.options_class, cfg)


class EncoderTask(RecipeTask):
    """Base of the encoder recipes: samples are dicts of token lists (``input_ids``, ``token_type_ids``,
    per-token targets: padded with -100) and ints (per-example targets); the loss unit is one example."""

    loss_unit = "example"

    def collate(self, samples: list) -> dict:
        pad_id = self.tokenizer.pad_token_id
        batch = {}
        for key, value in samples[0].items():
            if isinstance(value, list):
                fill = pad_id if key == "input_ids" else 0 if key == "token_type_ids" else -100
                batch[key] = pad([s[key] for s in samples], fill)
            else:
                batch[key] = torch.tensor([s[key] for s in samples])
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]).long()
        return batch

    def count(self, batch: dict) -> Tensor:
        return torch.tensor(batch["input_ids"].shape[0])

    @staticmethod
    def forward(model: nn.Module, batch: dict) -> dict:
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch})

    def callbacks(self) -> list:
        return [Monitor()]


def word_targets(word_ids: list, per_word: list) -> list:
    """Per-token targets from per-word ones: the first sub-token of each word carries its word's target,
    other sub-tokens and special tokens -100."""
    out, previous = [], None
    for w in word_ids:
        out.append(per_word[w] if w is not None and w != previous else -100)
        previous = w
    return out


def cross_entropy(cfg, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  reduction: str = "sum") -> Tensor:
    """fastft's cross-entropy (class weights, ignore_index -100), or torch's with ``kernels.loss`` off (the kernel stack)."""
    if cfg.kernels.stack.loss:
        from fastft.ops import cross_entropy as fused

        return fused(logits, target, weight, reduction=reduction)
    import torch.nn.functional as F

    w = None if weight is None else weight.to(logits.dtype)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), w, reduction=reduction)


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, device) -> list[str]:
    """The greedy completions of ``prompts`` (token id lists; left-padded so generation continues every
    prompt at the same column), decoded without special tokens, stripped."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = pad([[pad_id] * (width - len(p)) + p for p in prompts], pad_id)
    mask = pad([[0] * (width - len(p)) + [1] * len(p) for p in prompts], 0)
    out = unwrap(model).generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


@torch.no_grad()
def predict(model: nn.Module, task, samples: list, device) -> list[dict]:
    """``model``'s outputs over ``samples`` in eval mode, batch by batch (``eval.batch_size``), on the CPU.
    Every rank runs the whole (small) eval set, so every rank gets the same numbers and FSDP's
    collectives stay in step."""
    was_training = model.training
    model.eval()
    size = task.cfg.eval.batch_size
    outputs = []
    for start in range(0, len(samples), size):
        batch = {k: v.to(device) for k, v in task.collate(samples[start:start + size]).items()}
        out = EncoderTask.forward(model, batch)
        outputs.append({"batch": {k: v.cpu() for k, v in batch.items()},
                        "logits": {k: v.float().cpu() for k, v in out.items()}})
    model.train(was_training)
    return outputs


def classification_scores(y_true, y_pred, prefix: str = "") -> dict:
    """accuracy, weighted F1 and macro F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {f"{prefix}accuracy": float(accuracy_score(y_true, y_pred)),
            f"{prefix}f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
            f"{prefix}f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


# ------------------------------------------------------------------------------------------------
# Monitor: per-step statistics into metrics.jsonl, PNG curves of everything logged
# ------------------------------------------------------------------------------------------------


class StepStats:
    """Per-step sums a task accumulates (``add(name, total, count)``), averaged over ranks at log time."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, total: float, count: float) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += float(total)
        s[1] += float(count)

    def reset(self) -> None:
        self.sums = {}

    def averages(self, d) -> dict:
        names = sorted(self.sums)
        if not names:
            return {}
        values = torch.tensor([self.sums[n] for n in names], dtype=torch.float64, device=d.device)
        all_reduce_sum(values, d)
        return {n: float(v[0] / v[1]) if v[1] else float("nan") for n, v in zip(names, values)}


class Monitor(Callback):
    """Adds the task's per-step statistics (``task.stats``: a StepStats) to every logged record, and at
    the end draws every numeric series of ``metrics.jsonl`` (train and eval) to ``recipe_curves.png``."""

    SKIP = {"step", "seconds", "loss_tokens", "tokens", "padded_tokens", "padded_tokens_per_s"}

    def on_step_begin(self, trainer, step: int) -> None:
        stats = getattr(trainer.task, "stats", None)
        if stats is not None:
            stats.reset()

    def on_log(self, trainer, record: dict) -> None:
        stats = getattr(trainer.task, "stats", None)
        if stats is not None and "loss" in record:  # a train record (eval records carry eval_* keys)
            record.update(stats.averages(trainer.d))

    def on_train_end(self, trainer) -> None:
        if trainer.d.is_rank0 and trainer.cfg.run.plots:
            plot_all(trainer.output / "metrics.jsonl", trainer.output / "recipe_curves.png")


def plot_all(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastft.runtime.plots import read_metrics

    train, evals = read_metrics(metrics_path)
    series = []
    for records in (train, evals):
        keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in Monitor.SKIP})
        series += [(k, [(r["step"], r[k]) for r in records if k in r]) for k in keys]
    if not series:
        return
    cols = min(3, len(series))
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if key.startswith("eval_") else None,
                markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
