"""A training step of a tiny config-built Llama with LoRA on every linear, on CUDA in bf16: fastft (PEFT's layers
swapped for fastft.nn.LoRALinear, the loss patched to the fused linear cross-entropy) against PEFT + stock
transformers. Loss and every adapter gradient by the 2x rule against the same step run in fp64."""
import copy

import pytest
import torch

import fastft
from fastft.tuners import lora as fl
from fastft.integrations.causal_lm_loss import patch_causal_lm_loss

from cuda_truth import BACKENDS, check

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.cuda

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2


def _peft_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                   max_position_embeddings=64, attn_implementation="eager")
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # B = 0 at init would hide any mistake in the B path
    return model


def _step(peft_model, ids, dtype, fused: bool):
    """(loss, {layer.lora_A / layer.lora_B: gradient}) of one labelled forward + backward, in fp64."""
    model = copy.deepcopy(peft_model).to("cuda", dtype).train()
    if fused:
        fl.from_peft(model)
        patch_causal_lm_loss(model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            grads[name.replace(".default.weight", "")] = p.grad.double()
    return loss.detach().double(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_lora_step_matches_peft(backend):
    peft_model = _peft_model()
    ids = torch.randint(0, 1000, (2, 33), generator=torch.Generator().manual_seed(1)).cuda()
    exact_loss, exact_grads = _step(peft_model, ids, torch.float64, fused=False)
    plain_loss, plain_grads = _step(peft_model, ids, torch.bfloat16, fused=False)
    with fastft.backend.use(backend):
        loss, grads = _step(peft_model, ids, torch.bfloat16, fused=True)
    assert set(grads) == set(exact_grads) and len(grads) == 2 * len(TARGETS) * LAYERS
    check(loss, plain_loss, exact_loss, torch.bfloat16, "loss")
    for name in grads:
        check(grads[name], plain_grads[name], exact_grads[name], torch.bfloat16, name)
