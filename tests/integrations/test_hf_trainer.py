"""FastftCallback, the one switch for transformers' Trainer and TRL's SFTTrainer, on a tiny config-built
Llama with PEFT LoRA (CPU, fp32, no downloads): the profiler sees fastft's fused loss and LoRA ops in a
training step, every LoRA layer is fused whatever the order of loading, PEFT wrapping and patching, and
the losses (and SFT's logged entropy / mean_token_accuracy) equal stock's over 10 steps."""
from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import transformers  # noqa: E402

import fastft  # noqa: E402
from fastft.integrations.hf_trainer import FastftCallback  # noqa: E402
from patch_models import one_thread  # noqa: E402,F401
from test_trl import LETTERS, _common_args, _tokenizer, model_dir  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 10
LORA_LAYERS = 2 * 7  # 2 decoder layers x 7 linears ("all-linear" leaves the head out)


class ProfileOneStep(transformers.TrainerCallback):
    """torch.profiler over one training step (the third: past the first steps' one-time work)."""

    def __init__(self, step: int = 2) -> None:
        self.step, self.profiler, self.op_names = step, None, set()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.op_names = {event.key for event in self.profiler.key_averages()}
            self.profiler = None


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def _assert_same_history(fused, stock, keys, rtol):
    for key in keys:
        got, want = torch.tensor(_logged(fused, key)), torch.tensor(_logged(stock, key))
        assert len(want) == STEPS, key
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6, msg=lambda m: f"{key}: {m}")


def _fused_ops(names):
    return {n for n in names if n.startswith("fastft::")}


def _ran_fused_loss(names):
    """fastft's fused linear cross-entropy ran: its op (the registered op, or its eager autograd function on
    the CPU) and the fastft:: cross-entropy kernel it calls on each chunk."""
    fused = _fused_ops(names)
    return (any("linear_cross_entropy" in n for n in names)
            and any("cross_entropy" in n for n in fused) and not any("cross_entropy" in n for n in names - fused
                                                                      if n.startswith("aten::")))


def _ran_fused_log_probs_and_entropy(names):
    """fastft's chunked log-probs + entropy ran (SFTTrainer's loss asks for the entropy and top-1 flags too): its
    op (the registered op, or its eager autograd function on the CPU) and the fastft:: selective log-softmax
    kernel it calls on each chunk, and no aten log-softmax."""
    fused = _fused_ops(names)
    return (any("linear_selective_log_softmax" in n for n in names)
            and any("selective_log_softmax" in n for n in fused) and not any("log_softmax" in n for n in names - fused
                                                                              if n.startswith("aten::")))


def test_sft_trainer_peft_config_with_the_callback_matches_stock(model_dir, tmp_path):
    data = datasets.Dataset.from_dict({"text": [" ".join(LETTERS[i:i + 6 + i % 5]) for i in range(20)]})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")

    def run(fused):
        # fp32: SFTConfig defaults to bf16 autocast, also on the CPU
        args = trl.SFTConfig(max_steps=STEPS, per_device_train_batch_size=4, bf16=False, **_common_args(tmp_path))
        # the fused run loads through fastft's auto class, before SFTTrainer wraps the model with PEFT: the
        # callback fuses the LoRA layers that appear after the load
        auto = fastft.AutoModelForCausalLM if fused else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(model_dir)
        switch = FastftCallback() if fused else None
        profile = ProfileOneStep()
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(),
                                 peft_config=lora, callbacks=[profile] + ([switch] if switch else []))
        try:
            trainer.train()
        finally:
            if switch is not None:
                report, trl_report = switch.handle.report, switch.trl_handle.report()
                # the auto class patched the model before SFTTrainer put TRL's head over its forward
                with pytest.warns(UserWarning, match="wrapped after fastft.patch"):
                    switch.undo()
        return trainer, profile.op_names, (report, trl_report) if fused else None

    stock, stock_ops, _ = run(False)
    fused, fused_ops, (report, trl_report) = run(True)
    assert len(report.fused("lora")) == LORA_LAYERS and not report.stock("lora")
    # the loss and the metrics came from fastft's head, on every training step
    assert f"{STEPS}  fastft: log-probs + entropy/is_top1" in trl_report and "TRL:" not in trl_report
    assert _ran_fused_log_probs_and_entropy(fused_ops), sorted(fused_ops)
    assert any("lora_linear" in n for n in _fused_ops(fused_ops)), sorted(fused_ops)
    assert not _fused_ops(stock_ops)
    losses = _logged(stock, "loss")
    assert losses[-1] < losses[0]
    # measured: loss, grad_norm and entropy within 1.4e-7 relative; the accuracy is a count ratio
    _assert_same_history(fused, stock, ["loss", "grad_norm"], rtol=1e-5)
    _assert_same_history(fused, stock, ["entropy"], rtol=1e-6)
    assert _logged(fused, "mean_token_accuracy") == _logged(stock, "mean_token_accuracy")


def test_trainer_with_peft_model_and_the_callback_matches_stock(model_dir, tmp_path):
    tokenizer = _tokenizer()
    texts = [" ".join(LETTERS[i:i + 6]) for i in range(16)]
    ids = tokenizer(texts)["input_ids"]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    def run(fused):
        args = transformers.TrainingArguments(max_steps=STEPS, per_device_train_batch_size=4,
                                              **_common_args(tmp_path))
        torch.manual_seed(0)
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                       "lm_head"]))
        switch = FastftCallback() if fused else None
        profile = ProfileOneStep()
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=[profile] + ([switch] if switch else []))
        trainer.train()
        report = switch.handle.report if fused else None
        if switch is not None:
            switch.undo()
        return trainer, profile.op_names, report

    stock, stock_ops, _ = run(False)
    fused, fused_ops, report = run(True)
    assert len(report.fused("lora")) == 2 * 2 + 1 and "LoRA'd head fused" in report.fused("loss")[0].detail
    assert _ran_fused_loss(fused_ops) and not _fused_ops(stock_ops), sorted(fused_ops)
    _assert_same_history(fused, stock, ["loss", "grad_norm"], rtol=1e-5)


def test_callback_rejects_unknown_patch_options():
    with pytest.raises(TypeError, match=r"unknown fastft.patch options \['lora_rank'\]"):
        FastftCallback(lora_rank=8)
