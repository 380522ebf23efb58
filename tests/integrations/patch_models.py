"""Tiny config-built causal LMs of the architectures fastft.patch names (hidden 64, 2 layers, vocab 128;
no downloads), and the training loop the convergence tests run on them."""
from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 128
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **_IDS)

# model_type -> (config class, config arguments); each exercises what fastft fuses in it (softcaps on,
# Granite's logits_scaling != 1, Cohere's logit_scale, tied heads where the architecture ties by default).
CONFIGS = {
    "llama": (transformers.LlamaConfig, _DECODER),
    "mistral": (transformers.MistralConfig, _DECODER),
    "qwen2": (transformers.Qwen2Config, _DECODER),
    "qwen3": (transformers.Qwen3Config, {**_DECODER, "head_dim": 16}),
    "gemma2": (transformers.Gemma2Config, {**_DECODER, "head_dim": 16, "final_logit_softcapping": 5.0}),
    "gemma3_text": (transformers.Gemma3TextConfig, {**_DECODER, "head_dim": 16, "final_logit_softcapping": 5.0}),
    "phi3": (transformers.Phi3Config, _DECODER),
    "granite": (transformers.GraniteConfig, {**_DECODER, "logits_scaling": 4.0}),
    "olmo2": (transformers.Olmo2Config, _DECODER),
    "cohere": (transformers.CohereConfig, {**_DECODER, "logit_scale": 0.5}),
    "gpt_neox": (transformers.GPTNeoXConfig, {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2)),
}

# Causal LMs fastft.patch does not name: they take the generic path (one-batch check). Phi has a head bias,
# Mixtral / Qwen3-MoE route through experts, Cohere-2 scales its logits, OPT projects its embeddings.
GENERIC_CONFIGS = {
    "gemma": (transformers.GemmaConfig, {**_DECODER, "head_dim": 16}),
    "phi": (transformers.PhiConfig, _DECODER),
    "mixtral": (transformers.MixtralConfig, {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 32, "head_dim": 16}),
    "cohere2": (transformers.Cohere2Config, {**_DECODER, "logit_scale": 0.5}),
    "opt": (transformers.OPTConfig, dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                         **_IDS)),
}


def tiny_config(model_type: str, **overrides):
    config_class, kwargs = {**CONFIGS, **GENERIC_CONFIGS}[model_type]
    return config_class(**{**kwargs, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Dropout off (GPT-2 / NeoX default to 0.1): patched and stock runs draw the same masks, but a stock
    # model's attention-dropout call order is not the point of these tests.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def batches(steps: int, distinct: int = 4, batch: int = 2, length: int = 12, seed: int = 1):
    """``steps`` batches cycling through ``distinct`` random ones (so that 20 steps visibly learn)."""
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(distinct):
        ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
        labels = ids.clone()
        labels[0, :4] = -100  # a masked prompt
        pool.append((ids, labels))
    return [pool[i % distinct] for i in range(steps)]


def train(model, data, lr: float = 3e-3):
    """AdamW over the trainable parameters; the loss of every step and the final trainable parameters.
    eps=1e-6: parameters whose exact gradient is zero (a key bias: softmax is shift-invariant) get rounding
    noise as gradient, which Adam with eps=1e-8 turns into full-size steps of random sign."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, eps=1e-6)
    losses = []
    for ids, labels in data:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def one_thread():
    """Tiny GEMMs on a loaded 2-core machine: one intra-op thread is ~30x faster than two spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_peft_lora(model, targets, std: float = 0.05, r: int = 4, lora_alpha: int = 8):
    """``model`` under PEFT LoRA on ``targets`` with lora_B drawn from N(0, std) (PEFT starts it at 0, where the
    LoRA branch adds nothing and a wrong branch would pass unnoticed)."""
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return model
