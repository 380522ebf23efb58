"""Distillation recipe: the KL from both models' hidden states (fastft.rl.distillation_loss) equals F.kl_div on
full logits for every mode, gradients included; the layer-dropped student starts from the teacher's layers;
a short run lowers the eval KL; bad options are ConfigErrors."""
from __future__ import annotations

import pytest
import torch

from fastft.recipes.distillation import DistillationOptions, distillation_kl, distillation_sample
from fastft.runtime.config import ConfigError, load_config, replace
from fastft.runtime.parallel import unwrap
from fastft.runtime.trainer import Trainer
from recipe_helpers import fit, tiny_config

MODULE = "fastft.recipes.distillation"


def config(tmp_path, options=None, **sections):
    return tiny_config(tmp_path, MODULE, "distillation", "distillation_student",
                       {"teacher_builder": "tiny_llama", **(options or {})},
                       **{"data": {"generator": "addition", "num_train": 64, "num_eval": 16},
                          "model": {"num_layers": 4}, "batch": {"micro_batch_size": 8},
                          "eval": {"at_start": False, "at_end": False}, **sections})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    trainer = Trainer(config(tmp_path_factory.mktemp("distill"), run={"max_steps": 1}))
    return trainer, unwrap(trainer.model), trainer.task, trainer.task.collate(trainer.task.train_samples[:4])


def test_student_keeps_every_other_teacher_layer(setup):
    _, student, task, _ = setup
    teacher_layers, student_layers = task.teacher.model.layers, student.model.layers
    assert len(teacher_layers) == 4 and len(student_layers) == 2 and student.config.num_hidden_layers == 2
    for s, t in zip(student_layers, teacher_layers[::2]):
        torch.testing.assert_close(s.mlp.down_proj.weight, t.mlp.down_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student_layers] == [0, 1]


def plain_kl(student, teacher, batch, mode, mix, temperature):
    """The written-out definition: full logits of both models, sum_v p log(p / q) per position, masked mean."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    s = torch.log_softmax(student(input_ids=ids, attention_mask=attention).logits[:, :-1].double() / temperature, -1)
    t = torch.log_softmax(teacher(input_ids=ids, attention_mask=attention).logits[:, :-1].double() / temperature, -1)
    forward, reverse = (t.exp() * (t - s)).sum(-1), (s.exp() * (s - t)).sum(-1)
    per_token = {"forward": forward, "reverse": reverse, "mixed": mix * forward + (1 - mix) * reverse}[mode]
    m = batch["mask"].double()
    return ((per_token * m).sum() / m.sum()).float()


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("mode,mix,temperature", [("forward", 0.5, 1.0), ("reverse", 0.5, 1.0), ("mixed", 0.3, 2.0)])
@pytest.mark.parametrize("positions", ["all", "answer"])
def test_loss_and_gradients_match_full_logits(tmp_path, setup, kernels, mode, mix, temperature, positions):
    trainer, student, task, _ = setup
    o = DistillationOptions(teacher_builder="tiny_llama", mode=mode, mix=mix, temperature=temperature,
                            positions=positions)
    batch = task.collate([distillation_sample(e, positions) for e in task.train_examples[:4]])
    assert 0 < batch["mask"].sum() <= batch["attention_mask"][:, 1:].sum()
    cfg = replace(trainer.cfg, kernels={"loss": kernels})
    student.zero_grad()
    ours = distillation_kl(cfg, o, student, task.teacher, batch)
    ours.backward()
    ours_grad = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    theirs = plain_kl(student, task.teacher, batch, mode, mix, temperature)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert ours_grad
    for name, grad in ours_grad.items():
        torch.testing.assert_close(grad, dict(student.named_parameters())[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    student.zero_grad()


def test_eval_kl_falls(tmp_path):
    trainer, summary = fit(config(tmp_path, run={"max_steps": 15}, optim={"lr": 3e-3},
                                  eval={"at_start": True, "at_end": True}))
    start, end = summary["eval_start"], summary["eval_end"]
    assert end["kl"] < 0.7 * start["kl"], (start, end)
    assert end["teacher_exact_match"] == start["teacher_exact_match"]  # the teacher is frozen


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        Trainer(config(tmp_path, {"mode": "jsd"}))
    with pytest.raises(ConfigError, match="mix"):
        Trainer(config(tmp_path, {"mix": 1.5}))
    with pytest.raises(ConfigError, match="temperature"):
        Trainer(config(tmp_path, {"temperature": 0.0}))
    with pytest.raises(ConfigError, match="keep_every"):
        Trainer(config(tmp_path, {"keep_every": 0}))
    with pytest.raises(ConfigError, match="teacher_builder"):
        Trainer(config(tmp_path, {"teacher_builder": "nope"}))
    with pytest.raises(ConfigError, match="distillation_student"):
        Trainer(config(tmp_path, model={"builder": "tiny_llama"}))


def test_the_shipped_recipe_loads():
    cfg = load_config("recipes/distillation.toml", ["--recipe.options.mode=mixed"])
    assert cfg.data.task == "distillation" and cfg.recipe.options["mode"] == "mixed"
