"""fastft.patch on every named architecture: 20 AdamW steps patched vs stock (tiny configs, fp32), with and
without PEFT LoRA. The loss curves and the final trainable parameters agree to fp32 rounding over 20 steps,
and the report says what ran fused."""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import fastft  # noqa: E402
from fastft.integrations.patch import ARCHITECTURES  # noqa: E402
from patch_models import CONFIGS, batches, one_thread, tiny_model, train  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20
LOSS_RTOL = 1e-4  # fp32, 20 steps: measured <= 3e-5 (olmo2), typically 3e-7
PARAM_ATOL, PARAM_RTOL = 2e-4, 1e-3  # measured <= 2e-5 on AVX-512; 1.2e-4 (olmo2, one element) on an AVX2-only CPU


def test_every_named_architecture_has_a_tiny_config():
    assert set(CONFIGS) == set(ARCHITECTURES)


def _with_lora(model):
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B != 0, so that A gets a gradient from the first step
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return peft_model


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "peft-lora"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_patched_training_matches_stock(model_type, use_lora):
    model = tiny_model(model_type)
    if use_lora:
        model = _with_lora(model)
    stock = copy.deepcopy(model)
    data = batches(STEPS)
    stock_losses, stock_params = train(stock, data)

    handle = fastft.patch(model)
    report = handle.report
    assert report.path == "named" and report.fused("loss"), str(report)
    if use_lora:
        from peft.tuners.lora import LoraLayer

        peft_layers = [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
        fused = {e.module for e in report.fused("lora")}
        if model_type == "gpt2":  # Conv1D projections: PEFT's fan_in_fan_out LoRA stays PEFT's, and says why
            assert not fused and all("Conv1D" in e.detail for e in report.stock("lora")), str(report)
        else:
            assert fused == set(peft_layers), str(report)
    fused_losses, fused_params = train(model, data)

    assert stock_losses[-1] < stock_losses[0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(stock_losses), rtol=LOSS_RTOL, atol=0.0)
    assert fused_params.keys() == stock_params.keys()
    for name in stock_params:
        torch.testing.assert_close(fused_params[name], stock_params[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_bf16_training_error_within_twice_stocks(model_type):
    """bf16, PEFT LoRA including the head: the patched run's distance to the fp32 stock run (losses, final
    adapters) is at most twice stock bf16's own distance, plus a small atol."""
    model = tiny_model(model_type)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    data = batches(STEPS)
    truth_losses, truth_params = train(copy.deepcopy(model), data)
    model = model.to(torch.bfloat16)
    stock_losses, stock_params = train(copy.deepcopy(model), data)
    handle = fastft.patch(model)
    assert "LoRA'd head fused" in handle.report.fused("loss")[0].detail
    fused_losses, fused_params = train(model, data)

    def loss_error(losses):
        return (torch.tensor(losses) - torch.tensor(truth_losses)).abs().max().item()

    def param_error(params):
        return max((params[n].float() - truth_params[n]).abs().max().item() for n in truth_params)

    assert loss_error(fused_losses) <= 2 * loss_error(stock_losses) + 1e-3
    assert param_error(fused_params) <= 2 * param_error(stock_params) + 2e-3
