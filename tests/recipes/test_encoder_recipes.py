"""Multi-task, extractive QA, curriculum and continual-learning recipes on a tiny config-built encoder:
each learns its generated task by a stated margin in a few dozen steps."""
from __future__ import annotations

import pytest
import torch

from fastft.recipes.extractive_qa import best_span, squad_scores
from fastft.runtime.config import ConfigError, load_config
from fastft.runtime.trainer import Trainer
from recipe_helpers import fit, tiny_config


def config(tmp_path, module, task, builder, options=None, **sections):
    return tiny_config(tmp_path, f"fastft.recipes.{module}", task, builder, options or {},
                       **{"data": {"generator": "reviews", "max_length": 64},
                          "optim": {"lr": 3e-3}, **sections})


def test_multitask_both_heads_learn(tmp_path):
    """30 steps: tagging F1 >= 0.8 and sentiment accuracy up by >= 0.3, from one shared encoder. With
    kernels.loss on (the default): it patches causal LMs only, so an encoder with heads builds and
    trains with its own loss instead of failing on the patch."""
    _, summary = fit(config(tmp_path, "multitask", "multitask", "multitask_encoder", run={"max_steps": 30},
                            kernels={"loss": True}))
    assert summary["kernels"]["loss"]
    start, end = summary["eval_start"], summary["eval_end"]
    assert end["tags_f1"] >= 0.8, end
    assert end["label_accuracy"] >= start["label_accuracy"] + 0.3, (start, end)
    assert end["mean_f1"] == pytest.approx((end["label_f1_macro"] + end["tags_f1"]) / 2)


def test_multitask_loss_weights_select_the_task(tmp_path):
    """With tags_weight = 0 the tagging head gets no gradient."""
    trainer = Trainer(config(tmp_path, "multitask", "multitask", "multitask_encoder", {"tags_weight": 0.0},
                             run={"max_steps": 1}, eval={"at_start": False, "at_end": False}))
    batch = trainer.task.collate(trainer.task.train_samples[:8])
    trainer.task.loss(trainer.model, batch, torch.tensor(8.0)).backward()
    heads = dict(trainer.model.heads.named_parameters())
    assert heads["tags.weight"].grad is None or not heads["tags.weight"].grad.any()
    assert heads["label.weight"].grad.abs().sum() > 0


def test_extractive_qa_learns_spans(tmp_path):
    """40 steps on two-fact contexts: exact match up by >= 0.4."""
    _, summary = fit(config(tmp_path, "extractive_qa", "extractive_qa", "span_encoder", {"facts_per_context": 2},
                            run={"max_steps": 40}))
    start, end = summary["eval_start"], summary["eval_end"]
    assert end["exact_match"] >= start["exact_match"] + 0.4, (start, end)
    assert end["f1"] >= end["exact_match"]


def test_squad_scores_and_best_span():
    assert squad_scores("paris", "paris") == (1.0, 1.0)
    assert squad_scores("in paris", "paris") == (0.0, pytest.approx(2 / 3))
    assert squad_scores("", "paris") == (0.0, 0.0)
    start, end = torch.tensor([0.0, 5.0, 1.0, 9.0]), torch.tensor([0.0, 1.0, 6.0, 0.0])
    assert best_span(start, end, 2) == (1, 2)   # (3, 2) scores higher but ends before it starts
    assert best_span(start, end, 1) == (3, 3)


def test_curriculum_advances_and_learns_the_target(tmp_path):
    """Stages of 1 then 2 facts per context, threshold 0.8, eval every 10 steps: the run moves to the
    last stage and its target exact match rises by >= 0.3 in 40 steps."""
    trainer, summary = fit(config(tmp_path, "curriculum", "curriculum_qa", "curriculum_span_encoder",
                                  {"stages": [1, 2], "threshold": 0.8}, run={"max_steps": 40},
                                  eval={"every": 10}))
    stages = [r["stage"] for r in trainer.eval_history]
    assert stages[0] == 0 and stages[-1] == 1 and stages == sorted(stages), trainer.eval_history
    assert summary["eval_end"]["exact_match"] >= summary["eval_start"]["exact_match"] + 0.3, summary


def test_continual_ewc_forgets_less_than_plain_fine_tuning(tmp_path):
    """Task A 25 steps, then task B 25 steps: A's accuracy drop with EWC (lambda 1000) is smaller than
    without, by >= 0.1."""
    forgetting = {}
    for lam in (0.0, 1000.0):
        _, summary = fit(config(tmp_path / str(lam), "continual", "continual", "continual_encoder",
                                {"steps_per_task": 25, "ewc_lambda": lam}, run={"max_steps": 50},
                                eval={"at_start": False}))
        forgetting[lam] = summary["eval_end"]["forgetting"]
    assert forgetting[1000.0] <= forgetting[0.0] - 0.1, forgetting


def test_continual_resume_in_task_b_is_exact(tmp_path):
    """A run checkpointed in task B (step 8 of 6 + 6) and resumed ends with the same weights as the run
    that went on in memory: the phase, A's accuracy and EWC's Fisher and anchor come back."""
    def run(out, **sections):
        return fit(config(out, "continual", "continual", "continual_encoder",
                          {"steps_per_task": 6, "ewc_lambda": 1000.0, "fisher_samples": 8},
                          eval={"at_start": False, "at_end": False}, **sections))

    straight, _ = run(tmp_path / "a", run={"max_steps": 12, "resume": True}, checkpoint={"every": 8})
    ckpt = tmp_path / "a" / "checkpoints"
    assert [p.name for p in ckpt.glob("step_*")] == ["step_00000008"]
    resumed, summary = run(tmp_path / "a", run={"max_steps": 12, "resume": True})
    assert summary["resumed_from"] == 8 and resumed.task.phase == "b"
    assert resumed.task.accuracy_after_a == straight.task.accuracy_after_a
    want = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, want[name]), name


def test_continual_needs_two_phases(tmp_path):
    with pytest.raises(ConfigError, match="2 \\* recipe.options.steps_per_task"):
        Trainer(config(tmp_path, "continual", "continual", "continual_encoder", {"steps_per_task": 5},
                       run={"max_steps": 7}))


@pytest.mark.parametrize("name", ["multitask", "extractive_qa", "curriculum", "continual"])
def test_the_shipped_recipes_load(name):
    cfg = load_config(f"recipes/{name}.toml")
    assert cfg.recipe.module == f"fastft.recipes.{name}"
