"""fastft.integrations.fused_head.call_with_fused_head on tiny config-built causal LMs: token log-probs from the
head's operands inside the model's forward equal the stock logits' log_softmax + gather (values and every
trainable gradient) for plain, LoRA'd (PEFT and fastft), soft-capped (Gemma-2) and scaled (Granite, Cohere)
heads, on a loss-patched model too; the head's forward is restored; bad calls raise. FSDP2: see
tests/distributed/test_fsdp2.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fastft import rl  # noqa: E402
from fastft.integrations.fused_head import call_with_fused_head, fused_head_unsupported  # noqa: E402
from patch_models import tiny_model, with_peft_lora  # noqa: E402

TEMPERATURE = 0.7


def stock_logprobs(model, ids, targets):
    logits = model(input_ids=ids).logits[:, :-1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def fused_logprobs(model, ids, targets):
    return call_with_fused_head(
        model, lambda head: rl.token_logprobs(head.input[:, :-1], head.weight, targets, bias=head.bias,
                                              temperature=TEMPERATURE, softcap=head.softcap), input_ids=ids)


def lora(model, kind):
    if kind == "peft":
        pytest.importorskip("peft")
        return with_peft_lora(model, ["q_proj", "lm_head"], std=0.1)
    from fastft.tuners.lora import LoraConfig, apply

    apply(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def compare(model):
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (2, 9))
    targets = ids[:, 1:]
    trained = [p for p in model.parameters() if p.requires_grad]
    results = []
    for compute in (fused_logprobs, stock_logprobs):
        model.zero_grad(set_to_none=True)
        logp = compute(model, ids, targets)
        (logp * torch.linspace(0.5, 1.5, logp.shape[-1])).sum().backward()
        results.append((logp.detach(), *[p.grad for p in trained]))
    assert len(results[0]) > 1 and all(g is not None for g in results[0][1:])
    for fused, stock in zip(*results):
        torch.testing.assert_close(fused, stock, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "granite", "cohere"])
def test_equals_the_stock_logits_path(model_type):
    model = tiny_model(model_type)
    assert fused_head_unsupported(model) is None
    compare(model)
    assert "forward" not in vars(model.get_output_embeddings())  # the head's own forward is back


@pytest.mark.parametrize("kind", ["peft", "fastft"])
def test_lora_head_equals_the_stock_logits_path(kind):
    model = lora(tiny_model("llama"), kind)
    compare(model)


def test_on_a_loss_patched_model_the_patch_stays():
    import fastft

    model = tiny_model("llama")
    fastft.patch(model)
    head = model.get_output_embeddings()
    patched_forward = vars(head)["forward"]
    compare(model)
    assert vars(head)["forward"] is patched_forward
    ids = torch.randint(3, 128, (2, 9))
    assert model(input_ids=ids, labels=ids).logits is None  # the loss patch still fuses


def test_bad_calls_raise():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(ValueError, match="labels"):
        call_with_fused_head(model, lambda head: head.input, input_ids=ids, labels=ids)
    model.lm_head = nn.Sequential(nn.Linear(64, 128))
    assert "Sequential" in fused_head_unsupported(model)
    with pytest.raises(TypeError, match="Sequential"):
        call_with_fused_head(model, lambda head: head.input, input_ids=ids)


def test_a_forward_that_calls_its_head_twice_raises():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 6)

        def get_output_embeddings(self):
            return self.head

        def forward(self, x):
            return self.head(x) + self.head(x)

    with pytest.raises(RuntimeError, match="twice"):
        call_with_fused_head(TwoCalls(), lambda head: head.input, x=torch.randn(2, 4))
