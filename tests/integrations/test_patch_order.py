"""No ordering trap: a model patched before PEFT wraps it ends with every LoRA layer fused, after a second
``fastft.patch`` (which patches what is new) or at its first forward (with a warning naming the explicit
order); a forward whose head PEFT replaced after that first forward names the order instead of computing a
wrong loss."""
from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastft  # noqa: E402
from fastft.integrations.patch import get_handle  # noqa: E402
from patch_models import batches, one_thread, tiny_config, tiny_model, with_peft_lora  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"]


def _lora(model):
    return with_peft_lora(model, TARGETS)


def peft_lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _loss_and_grads(model):
    ids, labels = batches(1)[0]
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("first,explicit", [("AutoModelForCausalLM", True), ("patch", True), ("patch", False)])
def test_peft_after_patch_fuses_every_lora_layer(first, explicit):
    """PEFT after the patch: a second fastft.patch (explicit) or the model's first forward fuses the new layers."""
    stock_loss, stock_grads = _loss_and_grads(_lora(tiny_model("llama")))
    if first == "patch":
        model = tiny_model("llama")
        fastft.patch(model)
    else:
        torch.manual_seed(0)
        model = fastft.AutoModelForCausalLM.from_config(tiny_config("llama"))
        model.load_state_dict(tiny_model("llama").state_dict())
    handle = get_handle(model)
    peft_model = _lora(model)
    if explicit:
        assert fastft.patch(peft_model) is handle
        new = {e.module for e in handle.latest.fused("lora")}
        # "model": the PeftModel note; "loss": the patch moved to the LoRA'd head
        assert {e.part for e in handle.latest.fused()} == {"model", "lora", "loss"}
        assert "LoRA'd head fused" in handle.latest.fused("loss")[0].detail
    else:  # no second call: the first forward fuses what PEFT added, and says how to do it explicitly
        with pytest.warns(UserWarning, match=r"9 PEFT LoRA layers were added after fastft.patch.*get_peft_model"):
            loss, grads = _loss_and_grads(peft_model)
        new = {e.module for e in handle.report.fused("lora")}
    lora_layers = {name.removeprefix("base_model.model.") for name in peft_lora_layers(peft_model)}
    assert new == lora_layers and len(lora_layers) == 2 * 4 + 1  # 2 layers x 4 targets + lm_head
    assert not handle.report.stock("lora")

    loss, grads = _loss_and_grads(peft_model)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == stock_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    again = fastft.patch(peft_model).latest.entries  # nothing new to patch (at most the PeftModel note)
    assert all(e.part == "model" for e in again)
    handle.undo()
    assert not any("forward" in vars(m) for m in peft_model.modules() if m is not peft_model)


def test_head_lora_d_after_the_first_forward_names_the_order():
    model = tiny_model("llama")
    fastft.patch(model)
    _loss_and_grads(model)  # the first forward: nothing new then
    peft_model = _lora(model)
    # PEFT replaced the output layer under the live loss patch: the forward says what to do, not a wrong loss
    with pytest.raises(RuntimeError, match=r"call fastft.patch\(model\) again after get_peft_model"):
        _loss_and_grads(peft_model)
    assert len(fastft.patch(peft_model).latest.fused("lora")) == 9
    _loss_and_grads(peft_model)
    get_handle(peft_model).undo()
