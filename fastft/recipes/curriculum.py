"""Curriculum learning: training data staged from easy to hard, advancing when the current stage's
validation accuracy passes a threshold; the same steps without the curriculum are the baseline.

    fastft train recipes/curriculum.toml
    fastft train recipes/curriculum.toml --recipe.options.curriculum=false   # baseline: hardest data only

The task is extractive QA (:mod:`fastft.recipes.extractive_qa`) with difficulty = facts per context:
with one fact the answer is the only word of its kind; with more the model must also match the person
asked about. ``stages`` lists the facts per context of each stage, the last being the target. At
every eval (``eval.every``) the task reports the target's ``exact_match`` / ``f1`` and the current
stage's ``stage_exact_match``; when that reaches ``threshold``, training moves to the next stage.
``eval_stage`` in metrics.jsonl is the stage after that decision, which is where a resumed run goes on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from torch import nn

from fastft.runtime.config import ConfigError
from fastft.runtime.models import register_model
from fastft.runtime.tasks import register_task
from fastft.runtime.trainer import Callback

from .extractive_qa import ExtractiveQATask, QAOptions, span_model


@dataclass(frozen=True)
class CurriculumOptions(QAOptions):
    stages: list = (1, 2, 3)      # facts per context, easy to hard; the last is the target
    threshold: float = 0.8        # stage exact match that moves training to the next stage
    curriculum: bool = True       # false: train on the last stage from the first step (the baseline)

    def validate(self) -> None:
        super().validate()
        if not self.stages or any(not isinstance(s, int) or s < 1 for s in self.stages):
            raise ConfigError(f"recipe.options.stages must list positive facts-per-context counts, got {self.stages!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"recipe.options.threshold must be in (0, 1], got {self.threshold!r}")


@register_model("curriculum_span_encoder")
def curriculum_span_encoder(cfg):
    return span_model(cfg, CurriculumOptions)


@register_task("curriculum_qa")
class CurriculumQATask(ExtractiveQATask):
    metrics = {**ExtractiveQATask.metrics, "stage_exact_match": True}
    options_class = CurriculumOptions

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.stage_data = [self.generate(facts) for facts in self.options.stages]
        self.last = len(self.stage_data) - 1
        self.eval_samples = self.stage_data[self.last][1]
        self.set_stage(0 if self.options.curriculum else self.last)

    def set_stage(self, stage: int) -> None:
        self.stage = stage
        self.train_samples = self.stage_data[stage][0]

    def evaluate(self, model: nn.Module, d) -> dict:
        metrics = super().evaluate(model, d)  # the target (last stage)
        if self.stage == self.last:
            metrics["stage_exact_match"] = metrics["exact_match"]
        else:
            target, self.eval_samples = self.eval_samples, self.stage_data[self.stage][1]
            metrics["stage_exact_match"] = super().evaluate(model, d)["exact_match"]
            self.eval_samples = target
        metrics["stage"] = self.stage
        return metrics

    def callbacks(self) -> list:
        return [*super().callbacks(), Curriculum()]


class Curriculum(Callback):
    def on_train_begin(self, trainer) -> None:
        path = trainer.output / "metrics.jsonl"
        if trainer.step > 0 and path.is_file():  # resumed: the stage the last eval moved to
            stages = [json.loads(line).get("eval_stage") for line in path.read_text().splitlines()]
            stages = [s for s in stages if s is not None]
            if stages:
                trainer.task.set_stage(int(stages[-1]))

    def on_eval(self, trainer, step: int, metrics: dict) -> None:
        task = trainer.task
        if (task.options.curriculum and task.stage < task.last
                and metrics.get("stage_exact_match", 0.0) >= task.options.threshold):
            task.set_stage(task.stage + 1)
        metrics["stage"] = task.stage
