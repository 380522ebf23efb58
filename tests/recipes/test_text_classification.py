"""Text classification recipe: a tiny config-built encoder learns the generated sentiment labels;
bottleneck adapters (the run's [bottleneck] section) train with the head alone; class weights and
options are checked."""
from __future__ import annotations

import pytest
import torch

from fastft.runtime.config import ConfigError, load_config
from fastft.runtime.parallel import unwrap
from recipe_helpers import fit, tiny_config

MODULE = "fastft.recipes.text_classification"


def config(tmp_path, options=None, **sections):
    return tiny_config(tmp_path, MODULE, "text_classification", "text_classifier", options or {},
                       **{"data": {"generator": "reviews", "max_length": 32},
                          "eval": {"metric": "f1_macro"}, **sections})


def test_tiny_encoder_learns_the_labels(tmp_path):
    """30 steps from random init: macro F1 up by >= 0.25 and accuracy >= 0.7 (3 imbalanced classes)."""
    trainer, summary = fit(config(tmp_path, run={"max_steps": 30, "plots": True}, optim={"lr": 3e-3}))
    start, end = summary["eval_start"], summary["eval_end"]
    assert end["f1_macro"] >= start["f1_macro"] + 0.25, (start, end)
    assert end["accuracy"] >= 0.7, end
    assert set(end) == {"loss", "accuracy", "f1_weighted", "f1_macro"}
    assert (tmp_path / "recipe_curves.png").stat().st_size > 0


def test_balanced_class_weights_are_inverse_frequencies(tmp_path):
    trainer, _ = fit(config(tmp_path, run={"max_steps": 1}, eval={"at_start": False, "at_end": False}))
    labels = torch.tensor([s["labels"] for s in trainer.task.train_samples])
    counts = torch.bincount(labels, minlength=3).float()
    expected = len(labels) / (3 * counts)  # scikit-learn's "balanced"
    torch.testing.assert_close(trainer.task.class_weight, expected)
    assert trainer.task.class_weight[0] > trainer.task.class_weight[2]  # the rare class weighs most


def test_weighted_loss_matches_torch(tmp_path):
    """The task's loss (fastft's cross-entropy with class weights, summed / count) equals torch's."""
    trainer, _ = fit(config(tmp_path, run={"max_steps": 1}, eval={"at_start": False, "at_end": False}))
    task, model = trainer.task, unwrap(trainer.model).eval()
    batch = task.collate(task.train_samples[:16])
    with torch.no_grad():
        ours = task.loss(model, batch, torch.tensor(16.0))
        logits = task.forward(model, batch)["label"]
        theirs = torch.nn.functional.cross_entropy(logits, batch["labels"], task.class_weight, reduction="sum") / 16
    torch.testing.assert_close(ours, theirs)


def test_bottleneck_adapters_train_alone_and_are_saved(tmp_path):
    """[bottleneck] on an encoder with a head: the adapters and the head train (the head through
    EncoderWithHeads.train_with_methods), the encoder stays as it was, the adapters are exported."""
    from fastft.runtime.trainer import Trainer

    cfg = config(tmp_path, run={"max_steps": 3, "export_methods": True}, eval={"at_start": False, "at_end": False},
                 bottleneck={"enabled": True, "adapter_size": 8, "dropout": 0.0})
    trainer = Trainer(cfg)
    model = unwrap(trainer.model)
    frozen = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if "fastft_adapter" not in n}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("heads.") for n in trained) and any("fastft_adapter" in n for n in trained)
    assert all("fastft_adapter" in n or n.startswith("heads.") for n in trained)
    trainer.fit()
    for n, p in model.encoder.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert (tmp_path / "bottleneck" / "bottleneck_model.safetensors").is_file()


def test_moved_adapter_options_say_where_they_went(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.options.adapters moved to the run's \[bottleneck\] section"):
        fit(config(tmp_path, {"adapters": "bottleneck"}))


def test_bad_options_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="recipe.options.colour"):
        fit(config(tmp_path, {"colour": "red"}))
    with pytest.raises(ConfigError, match="recipe.options.class_weights"):
        fit(config(tmp_path, {"class_weights": "inverse"}))


def test_the_shipped_recipe_loads_with_overrides():
    cfg = load_config("recipes/text_classification.toml", ["--recipe.options.class_weights=none", "--run.max_steps=5"])
    assert cfg.recipe.options["class_weights"] == "none" and cfg.bottleneck.enabled and not cfg.lora.enabled
    assert cfg.run.max_steps == 5 and cfg.data.task == "text_classification"
