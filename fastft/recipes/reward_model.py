"""Reward model: a scalar head on a pretrained decoder, trained on preference pairs with the
Bradley–Terry loss; the PPO recipe (fastft.recipes.rlhf, ``recipe.options.reward_model``) scores its
samples with the exported model.

    fastft train recipes/reward_model.toml

The model (``model.builder = "reward_model"``) is the decoder of the causal LM that
``recipe.options.backbone`` builds (its LM head dropped) with a :class:`~fastft.recipes.common.ScalarHead`
read at each sequence's last non-pad token. LoRA (``[lora]``) tunes the decoder, the head trains in full
(``train_with_methods``). The loss is ``fastft.rl.bradley_terry_loss(score(chosen), score(rejected))``.

Data: ``data.generator = "arithmetic_preferences"``, "Compute a + b." with a checkable preferred answer:
the right sum against a wrong one (``wrong_sum``), or against a malformed answer (``malformed``: words,
the question echoed, no number). Held-out pairs whose question is also a training question are dropped,
so the eval measures other prompts. Eval metric: pairwise accuracy (score(chosen) > score(rejected)),
also per kind of pair. At the end the model is exported to ``<output_dir>/<recipe.options.export>``: the
decoder with LoRA merged (a Hugging Face folder: ``AutoModel`` loads it), ``score.safetensors`` (the
head) and the tokenizer; :func:`load_reward_model` reads it back.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastft.rl import bradley_terry_loss
from fastft.runtime import data as D
from fastft.runtime.config import ConfigError
from fastft.runtime.models import BUILDERS, ModelLoadError, register_model
from fastft.runtime.parallel import unwrap
from fastft.runtime.tasks import register_task
from fastft.runtime.trainer import Callback

from .common import Monitor, RecipeTask, ScalarHead, StepStats, last_token_hidden, pad, recipe_options

SCORE_FILE = "score.safetensors"


@dataclass(frozen=True)
class RewardOptions:
    backbone: str = "hf"             # the model builder whose causal LM's decoder carries the score head
    export: str = "reward_model"     # folder under run.output_dir for the exported model ("" = none)

    def validate(self) -> None:
        if self.backbone not in BUILDERS or self.backbone == "reward_model":
            known = ", ".join(b for b in BUILDERS if b != "reward_model")
            raise ConfigError(f"recipe.options.backbone = {self.backbone!r} is not a causal-LM builder; known: {known}")


def rm_text(question: str, answer: str) -> str:
    """What the reward model reads: one format for its training pairs and for the PPO samples it scores."""
    return f"Question: {question}\nAnswer: {answer}"


MALFORMED = ("The answer is", "{a} + {b}", "I don't know.", "Compute {a} + {b}.", "sum", "?", "a number",
             "Let me think about it.")


@D.register_generator("arithmetic_preferences")
def arithmetic_preferences(n: int, seed: int) -> list[dict]:
    """"Compute a + b." (a, b in 0..12: sums this 135M model can still do) with the right sum preferred over a wrong sum (off by 1 to 3, by
    10, or a - b / a * b) or over a malformed answer (no number, or the question echoed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        right = a + b
        if rng.random() < 0.5:
            kind = "wrong_sum"
            wrong = rng.choice([right + rng.choice([-3, -2, -1, 1, 2, 3]), right + rng.choice([-10, 10]),
                                abs(a - b), a * b])
            if wrong == right or wrong < 0:
                wrong = right + 1
            rejected = str(wrong)
        else:
            kind = "malformed"
            rejected = rng.choice(MALFORMED).format(a=a, b=b)
        out.append({"question": f"Compute {a} + {b}.", "chosen": str(right), "rejected": rejected, "kind": kind})
    return out


class ScalarHeadModel(nn.Module):
    """A decoder (``AutoModel``: final hidden states) and a scalar head read at each row's last non-pad
    token: ``forward(input_ids, attention_mask) -> [B]`` scores."""

    train_with_methods = ("score",)  # the new head trains along with the decoder's LoRA

    def __init__(self, decoder: nn.Module, score: ScalarHead | None = None):
        super().__init__()
        self.model = decoder
        self.score = score if score is not None else ScalarHead(decoder.config.hidden_size)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.score(last_token_hidden(hidden, attention_mask)).squeeze(-1).float()


@register_model("reward_model")
def reward_model(cfg):
    """The causal LM of ``recipe.options.backbone``, its decoder kept and a scalar head added (seeded from
    run.seed, so every rank starts from the same head)."""
    options = recipe_options(RewardOptions, cfg)
    lm, tokenizer = BUILDERS[options.backbone](cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 3)
        model = ScalarHeadModel(lm.get_decoder())
    return model, tokenizer


def export_reward_model(model: nn.Module, tokenizer, folder: Path) -> Path:
    """A copy of ``model`` with its LoRA merged into the decoder, saved as a Hugging Face folder plus the
    head's weights and the tokenizer (single process: the weights must be whole on this rank)."""
    from safetensors.torch import save_file

    from fastft.tuners import merge_and_unload

    merged = merge_and_unload(copy.deepcopy(unwrap(model)))
    folder.mkdir(parents=True, exist_ok=True)
    merged.model.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in merged.score.state_dict().items()}, str(folder / SCORE_FILE))
    tokenizer.save_pretrained(folder)
    return folder


def load_reward_model(path: str, dtype: torch.dtype = torch.float32) -> tuple[ScalarHeadModel, object]:
    """(reward model in eval mode with frozen weights, its tokenizer) from an :func:`export_reward_model` folder."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    if not (folder / SCORE_FILE).is_file():
        raise ModelLoadError(f"reward model {path!r}: no {SCORE_FILE} (not a folder the reward_model recipe exported)")
    decoder = AutoModel.from_pretrained(folder, dtype=dtype)
    model = ScalarHeadModel(decoder)
    model.score.load_state_dict(load_file(str(folder / SCORE_FILE)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval().requires_grad_(False), tokenizer


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, EOS appended: the score is read at the token after the whole answer."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [list(tokenizer(t, add_special_tokens=True)["input_ids"]) + eos for t in texts]


def score_batch(model: nn.Module, rows: list[list[int]], pad_id: int, device) -> Tensor:
    """Scores [N] of token rows (right padded here)."""
    ids = pad(rows, pad_id).to(device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    mask = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
    return model(input_ids=ids, attention_mask=mask)


@register_task("reward_model")
class RewardTask(RecipeTask):
    options_class = RewardOptions
    metrics = {"pairwise_accuracy": True, "wrong_sum_accuracy": True, "malformed_accuracy": True}
    loss_unit = "preference pair"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        if cfg.model.builder != "reward_model":
            raise ConfigError(f"model.builder = {cfg.model.builder!r}: the reward_model task needs model.builder = "
                              "'reward_model' (a decoder with a scalar head)")
        train, held_out = D.load_records(cfg)
        seen = {r.get("question") for r in train}
        held_out = [r for r in held_out if r.get("question") not in seen]  # other prompts only
        self.train_samples = [self._sample(r, i) for i, r in enumerate(train)]
        self.eval_samples = [self._sample(r, i) for i, r in enumerate(held_out)]
        self.kinds = [r.get("kind", "") for r in held_out]
        e = cfg.eval
        if not self.eval_samples and (e.at_start or e.at_end or e.every):
            raise ConfigError(f"no held-out pair: every question {cfg.data.generator!r} drew for eval is also a "
                              f"training question; lower data.num_train (now {cfg.data.num_train})")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stats = StepStats()

    def _sample(self, record: dict, index: int) -> dict:
        for key in ("question", "chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise D.DataError(f"preference record {index}: needs a string {key!r}, got {record!r}")
        chosen, rejected = encode_texts(self.tokenizer, [rm_text(record["question"], record["chosen"]),
                                                         rm_text(record["question"], record["rejected"])])
        n = self.cfg.data.max_length
        return {"chosen": chosen[-n:], "rejected": rejected[-n:]}

    def collate(self, samples: list) -> dict:
        """Chosen rows then rejected rows, right padded: [2B, T]."""
        rows = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
        ids = pad(rows, self.pad_id)
        lengths = torch.tensor([len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()}

    def count(self, batch: dict) -> Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    @staticmethod
    def pair_scores(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        chosen, rejected = self.pair_scores(model, batch)
        n = chosen.shape[0]
        with torch.no_grad():
            self.stats.add("train_pairwise_accuracy", (chosen > rejected).sum().item(), n)
            self.stats.add("margin", (chosen - rejected).sum().item(), n)
        return bradley_terry_loss(chosen, rejected) * n / normalizer

    @torch.no_grad()
    def evaluate(self, model: nn.Module, d) -> dict:
        was_training = model.training
        model.eval()
        size = self.cfg.eval.batch_size
        right, losses = [], []
        for start in range(0, len(self.eval_samples), size):
            batch = {k: v.to(d.device) for k, v in self.collate(self.eval_samples[start:start + size]).items()}
            chosen, rejected = self.pair_scores(model, batch)
            right += (chosen > rejected).tolist()
            losses.append(bradley_terry_loss(chosen, rejected) * chosen.shape[0])
        model.train(was_training)
        n = max(1, len(right))
        metrics = {"pairwise_accuracy": sum(right) / n, "loss": float(sum(losses)) / n}
        for kind in sorted(set(self.kinds)):
            picked = [r for r, k in zip(right, self.kinds) if k == kind]
            if kind and picked:
                metrics[f"{kind}_accuracy"] = sum(picked) / len(picked)
        return metrics

    def callbacks(self) -> list:
        return [Monitor(), ExportRewardModel()]


class ExportRewardModel(Callback):
    """At the end of the run: :func:`export_reward_model` to ``<output_dir>/<recipe.options.export>``."""

    def on_train_end(self, trainer) -> None:
        folder = trainer.task.options.export
        if not folder:
            return
        if trainer.d.world > 1:
            raise NotImplementedError("exporting the reward model from a multi-process run is not supported; "
                                      "set recipe.options.export = '' and export from a checkpoint")
        path = export_reward_model(trainer.model, trainer.tokenizer, trainer.output / folder)
        print(f"reward model exported to {path} (recipe.options.reward_model = {str(path)!r} in the PPO recipe)",
              flush=True)
