"""A GRPO-style loss step with fastft's KL ops (runs on a CPU in seconds; no downloads).

Per prompt, a group of G sampled completions is scored; advantages are the rewards normalized within
the group. The per-token loss is TRL's GRPO loss,

    -(exp(logp - logp.detach()) * A) + beta * KL_t,        averaged over each completion's tokens,

with KL_t either the k3 estimator of the sampled tokens (``kl="k3"``: selective_log_softmax gives
the log-probs without a [B, T, V] log-softmax, kl_penalty the estimate) or the exact full-vocabulary
KL(pi || pi_ref) computed from the two models' last hidden states and heads by linear_full_kl
(``kl="full"``: neither [B, T, V] logits tensor is ever held).

    python docs/examples/grpo_step.py            # both variants, a few steps
"""
from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastft.ops import kl_penalty, linear_full_kl, selective_log_softmax


def tiny_llama(vocab: int = 512) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def toy_reward(completions: torch.Tensor) -> torch.Tensor:
    """Fraction of even token ids: something for the policy to learn."""
    return (completions % 2 == 0).float().mean(-1)


def grpo_loss(policy, ref, input_ids, completion_mask, prompt_len, advantages, *, beta=0.04, temperature=1.0,
              kl="k3"):
    # Hidden states at the positions that predict each completion token (t predicts t + 1).
    h_p = policy.model(input_ids).last_hidden_state[:, prompt_len - 1:-1]
    with torch.no_grad():
        h_r = ref.model(input_ids).last_hidden_state[:, prompt_len - 1:-1]
    tokens = input_ids[:, prompt_len:]
    logits = policy.lm_head(h_p)
    logp = selective_log_softmax(logits, tokens, temperature=temperature)
    ratio = torch.exp(logp - logp.detach())  # 1, with the policy gradient (one update per generation)
    per_token = -ratio * advantages[:, None]
    if beta:
        if kl == "k3":
            with torch.no_grad():
                ref_logp = selective_log_softmax(ref.lm_head(h_r), tokens, temperature=temperature)
            per_token = per_token + beta * kl_penalty(logp, ref_logp, estimator="k3")
        else:  # exact KL over the vocabulary, straight from the hidden states
            per_token = per_token + beta * linear_full_kl(h_p, policy.lm_head.weight, h_r, ref.lm_head.weight,
                                                          temperature=temperature, reduction="none")
    mask = completion_mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def main(steps: int = 3, kl: str = "k3", group: int = 4, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    policy = tiny_llama()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    prompts = torch.randint(0, 512, (2, 6))
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            seqs = policy.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                   max_new_tokens=8, num_return_sequences=group, pad_token_id=0)
        prompt_len = prompts.shape[1]
        completions = seqs[:, prompt_len:]
        completion_mask = torch.ones_like(completions, dtype=torch.bool)
        rewards = toy_reward(completions).view(-1, group)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        loss = grpo_loss(policy, ref, seqs, completion_mask, prompt_len, advantages, kl=kl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    for variant in ("k3", "full"):
        print(variant, [round(x, 4) for x in main(kl=variant)])
