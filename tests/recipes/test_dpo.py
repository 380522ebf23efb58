"""DPO recipe: the summed completion log-probs and the loss match a plain-torch reimplementation (full logits,
log_softmax + gather, the DPO formulas written out) and TRL's DPOTrainer on the same batch and weights; a
short run widens the reward margin; bad options are ConfigErrors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastft.recipes.dpo import DPOOptions, dpo_terms, preference_batch, sequence_logprobs
from fastft.runtime.config import ConfigError, load_config, replace
from fastft.runtime.models import byte_tokenizer
from fastft.runtime.trainer import Trainer
from recipe_helpers import fit, tiny_config

MODULE = "fastft.recipes.dpo"


def config(tmp_path, options=None, **sections):
    return tiny_config(tmp_path, MODULE, "dpo", "tiny_llama", {"beta": 0.1, **(options or {})},
                       **{"data": {"generator": "addition_preferences", "num_train": 64, "num_eval": 16},
                          "batch": {"micro_batch_size": 8}, "eval": {"at_start": False, "at_end": False}, **sections})


def plain_logprobs(model, batch):
    """Summed completion log-probs from the full [2B, T, V] logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def plain_dpo(pc, pr, rc, rr, tc, tr, o: DPOOptions):
    delta = (pc - rc) - (pr - rr)
    if o.loss_type == "sigmoid":
        losses = (-F.logsigmoid(o.beta * delta) * (1 - o.label_smoothing)
                  - F.logsigmoid(-o.beta * delta) * o.label_smoothing)
    elif o.loss_type == "hinge":
        losses = torch.relu(1 - o.beta * delta)
    else:
        losses = ((pc - rc) / tc - (pr - rr) / tr - 1 / (2 * o.beta)) ** 2
    return losses.mean()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    trainer = Trainer(config(tmp_path_factory.mktemp("dpo"), run={"max_steps": 1}))
    model, task = trainer.model, trainer.task
    with torch.no_grad():  # a policy that differs from the reference, so the log-ratios are not all 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return trainer, model, task, task.collate(task.train_samples[:4])


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("options", [{"loss_type": "sigmoid"}, {"loss_type": "sigmoid", "label_smoothing": 0.2},
                                     {"loss_type": "hinge", "beta": 0.5}, {"loss_type": "ipo", "beta": 0.3}])
def test_loss_matches_plain_torch(setup, kernels, options):
    trainer, model, task, batch = setup
    cfg = replace(trainer.cfg, kernels={"loss": kernels})
    o = DPOOptions(**options)
    loss, chosen, rejected = dpo_terms(cfg, o, model, task.reference, batch)
    with torch.no_grad():
        policy, ref = plain_logprobs(model, batch), plain_logprobs(task.reference, batch)
    tokens = batch["completion_mask"].sum(-1).float()
    (pc, pr), (rc, rr), (tc, tr) = policy.chunk(2), ref.chunk(2), tokens.chunk(2)
    torch.testing.assert_close(loss, plain_dpo(pc, pr, rc, rr, tc, tr, o), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chosen, o.beta * (pc - rc), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, o.beta * (pr - rr), atol=1e-5, rtol=1e-5)


def test_fused_gradients_match_full_logits(setup):
    """The gradient the fused head sends to the policy equals the full-logits path's."""
    trainer, model, task, batch = setup
    grads = []
    for kernels in (True, False):
        model.zero_grad()
        sequence_logprobs(replace(trainer.cfg, kernels={"loss": kernels}), model, batch).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


def trl_trainer(tmp_path, model, ref_model, tokenizer, loss_type: str, beta: float):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = [{"prompt": f"Compute {a} + {b} = ", "chosen": str(a + b), "rejected": str(a + b + 3)}
             for a, b in [(12, 30), (7, 45), (66, 21), (3, 9)]]
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True,
                     per_device_train_batch_size=4, max_length=None, dataset_num_proc=None, logging_strategy="no",
                     save_strategy="no", bf16=False, fp16=False)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(pairs),
                      processing_class=tokenizer)


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("hinge", 0.5), ("ipo", 0.3)])
def test_loss_matches_trl_dpo_trainer(tmp_path, setup, kernels, loss_type, beta):
    """TRL's DPOTrainer (its collator's batch, its compute_loss with its fused head) and fastft's recipe on
    the same batch and the same policy / reference weights: the losses agree within 1e-5 (fp32)."""
    trainer, model, task, _ = setup
    from fastft.runtime.parallel import unwrap

    policy = copy.deepcopy(unwrap(model))  # TRL patches the forward of what it gets: give it copies
    trl = trl_trainer(tmp_path, policy, copy.deepcopy(task.reference), byte_tokenizer(), loss_type, beta)
    batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        theirs = trl.compute_loss(trl.model, dict(batch))
        ours = dpo_terms(replace(trainer.cfg, kernels={"loss": kernels}), DPOOptions(beta=beta, loss_type=loss_type),
                         model, task.reference, {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")})[0]
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())


def test_preference_batch_is_trls_layout():
    """The recipe's collator gives TRL's DataCollatorForPreference output (its docstring's example)."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    samples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
               {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    theirs = DataCollatorForPreference(pad_token_id=0)(samples)
    ours = preference_batch(samples, 0)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert ours[key].tolist() == theirs[key].tolist(), key


def test_training_widens_the_reward_margin(tmp_path):
    """20 steps from a random tiny Llama: the training reward margin of the last steps beats the first."""
    trainer, summary = fit(config(tmp_path, {"beta": 0.5}, run={"max_steps": 20}, optim={"lr": 3e-3},
                                  eval={"at_end": True}))
    h = trainer.history
    first, last = (sum(r["reward_margin"] for r in rows) / 5 for rows in (h[:5], h[-5:]))
    assert last > first + 0.15, [round(r["reward_margin"], 3) for r in h]
    assert h[-1]["loss"] < h[0]["loss"]
    # held-out pairs of a random byte-level model do not move in 20 steps; the SmolLM2 run measures them
    assert set(summary["eval_end"]) == {"reward_accuracy", "preference_accuracy", "exact_match"}


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="loss_type"):
        Trainer(config(tmp_path, {"loss_type": "kto"}))
    with pytest.raises(ConfigError, match="beta"):
        Trainer(config(tmp_path, {"beta": 0}))
    with pytest.raises(ConfigError, match="label_smoothing"):
        Trainer(config(tmp_path, {"loss_type": "hinge", "label_smoothing": 0.1}))
    with pytest.raises(ConfigError, match="recipe.options.temperature"):
        Trainer(config(tmp_path, {"temperature": 0.5}))
    with pytest.raises(ConfigError, match="rejected"):
        Trainer(config(tmp_path, data={"generator": "addition"}))


def test_the_shipped_recipe_loads():
    cfg = load_config("recipes/dpo.toml", ["--recipe.options.loss_type=ipo"])
    assert cfg.data.task == "dpo" and cfg.recipe.options["loss_type"] == "ipo"
