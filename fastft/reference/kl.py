"""KL penalties for RLHF / distillation, in plain torch (the oracle for tests, and the fallback).

Notation per token (row) with policy logits x_p, reference logits x_r, temperature T:
    a = x_p / T, b = x_r / T, pi = softmax(a), rho = softmax(b)
    full_kl      = sum_v pi_v (log pi_v - log rho_v)                         (= KL(pi || rho))
                   with reverse_weight w: (1 - w) KL(pi || rho) + w KL(rho || pi) (a weight-0 direction left out)
    selective_log_softmax(x, y) = log softmax(x / T)[y]   (and the entropy H = -sum_v pi_v log pi_v);
                 with a soft cap c the logits are c * tanh(x / c) first, then / T (Gemma-2/3's head)
    linear_selective_log_softmax(h, W, y) = selective_log_softmax(h @ W^T (+ b), y)
    kl_penalty   per-token estimators of KL(pi || rho) from the sampled tokens' log-probs
                 (Schulman, "Approximating KL divergence", 2020; TRL's names), d = logp - ref_logp:
                 k1 = d,  k2 = d^2 / 2,  k3 = exp(-d) + d - 1 (= expm1(-d) + d),  abs = |d|
                 (k3 at d = -inf is +inf, its limit; d = NaN, e.g. both log-probs -inf, stays NaN)
    linear_full_kl = full_kl(h_p @ W_p^T, h_r @ W_r^T)

``mask`` (True / nonzero = counted) zeroes a token; "mean" divides by the number of counted tokens
and gives 0 when there is none.

Hostile values (every backend keeps the same contract; tests/ops/test_hostile_kl.py): -inf logits are
ordinary (banned tokens); NaN, +inf, or an all -inf row make that row's full_kl / log-prob NaN, with
NaN gradient rows; full_kl is +inf where the policy has mass on a token whose reference logit is -inf
(there the kernels' policy gradient row is NaN, the reference gradient (rho - pi) / T finite). Masked
tokens are never read: whatever they hold, they give 0 and a zero gradient. Math in fp32 (fp64 for fp64 input); results in the input's dtype.
The vocabulary dimension is the last one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ESTIMATORS = ("k1", "k2", "k3", "abs")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(per_token: Tensor, mask: Optional[Tensor], reduction: str, out_dtype: torch.dtype) -> Tensor:
    if mask is not None:
        counted = mask.reshape(per_token.shape) != 0
        per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token.to(out_dtype)
    total = per_token.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    count = per_token.new_tensor(float(per_token.numel())) if mask is None else counted.sum().to(per_token.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).to(out_dtype)


def full_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    *,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    reverse_weight: float = 0.0,
) -> Tensor:
    acc = _acc(policy_logits.dtype)
    policy, ref = policy_logits.to(acc), ref_logits.to(acc)
    if mask is not None:
        # A masked row is never read (as in the kernels): NaN or inf there must not reach the gradient
        # through 0 * NaN.
        counted = (mask != 0).reshape(policy.shape[:-1] + (1,))
        policy = torch.where(counted, policy, torch.zeros_like(policy))
        ref = torch.where(counted, ref, torch.zeros_like(ref))
    logp = torch.log_softmax(policy / temperature, dim=-1)
    logr = torch.log_softmax(ref / temperature, dim=-1)
    # Each direction only when its weight is > 0: a weight-0 KL of +inf would make the mix 0 * inf = NaN.
    per_token = 0
    if reverse_weight < 1:
        per_token = (1 - reverse_weight) * _kl_rows(logp, logr)
    if reverse_weight > 0:
        per_token = per_token + reverse_weight * _kl_rows(logr, logp)
    return _reduce(per_token, mask, reduction, policy_logits.dtype)


def _kl_rows(logp: Tensor, logr: Tensor) -> Tensor:
    """sum_v p_v (log p_v - log r_v) over the last dimension from two log-softmaxes."""
    p = logp.exp()
    # A token p bans (logit -inf, p = 0) contributes 0, not 0 * inf = NaN; the where sits inside the
    # product so no NaN reaches the gradient either. A NaN p keeps its NaN (p == 0 is False for it): the
    # other row's gradient must not come out a silent 0 through the where.
    diff = torch.where(p == 0, torch.zeros_like(p), logp - logr)
    return (p * diff).sum(-1)


def log_softmax_entropy(logits: Tensor, temperature: float = 1.0,
                        softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """(log_softmax(softcap(logits) / T) [..., V], its entropy -sum_v p_v log p_v [...]) in the accumulation
    dtype; ``softcap``: ``c * tanh(logits / c)``, None for none. A token with p_v = 0 (logit -inf) contributes
    0: the where sits inside the product, so neither the value nor the gradient meets 0 * -inf."""
    logits = logits.to(_acc(logits.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return logp, entropy


def selective_log_softmax(logits: Tensor, index: Tensor, *, temperature: float = 1.0,
                          softcap: Optional[float] = None, return_entropy: bool = False):
    logp, entropy = log_softmax_entropy(logits, temperature, softcap)
    picked = logp.gather(-1, index.unsqueeze(-1).to(torch.int64)).squeeze(-1).to(logits.dtype)
    return (picked, entropy.to(logits.dtype)) if return_entropy else picked


def linear_selective_log_softmax(hidden: Tensor, weight: Tensor, index: Tensor, *, bias: Optional[Tensor] = None,
                                 temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                                 return_entropy: bool = False):
    """selective_log_softmax of ``hidden @ weight.T + bias`` (the whole logits), in the accumulation dtype
    (fp32; fp64 for fp64); rows whose index is ``ignore_index`` give 0 (and no gradient)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    counted = index != ignore_index
    safe = torch.where(counted, index, torch.zeros_like(index)).to(torch.int64)
    logp, entropy = log_softmax_entropy(logits, temperature, softcap)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    picked = torch.where(counted, logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    return (picked, torch.where(counted, entropy, zero)) if return_entropy else picked


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    estimator: str = "k3",
    mask: Optional[Tensor] = None,
    reduction: str = "none",
) -> Tensor:
    out_dtype = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    acc = _acc(out_dtype)
    d = logprobs.to(acc) - ref_logprobs.to(acc)
    if mask is not None:
        # Masked tokens (padding: logprobs of -inf or NaN included) must give exactly 0 gradient, not
        # 0 * inf = NaN through the estimator's derivative.
        d = torch.where(mask.reshape(d.shape) != 0, d, torch.zeros_like(d))
    if estimator == "k1":
        per_token = d
    elif estimator == "k2":
        per_token = 0.5 * d * d
    elif estimator == "k3":
        # d = -inf (the policy gives the sampled token probability 0): k3 = exp(-d) + d - 1 -> +inf, with
        # derivative 1 - exp(-d) -> -inf; expm1(inf) + (-inf) would be NaN. Each branch sees only its own
        # entries, so neither leaks inf * 0 = NaN into the other's gradient.
        banned = d == float("-inf")
        zero = torch.zeros_like(d)
        d_finite = torch.where(banned, zero, d)
        per_token = torch.where(banned, torch.exp(-torch.where(banned, d, zero)), torch.expm1(-d_finite) + d_finite)
    elif estimator == "abs":
        per_token = d.abs()
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return _reduce(per_token, mask, reduction, out_dtype)


def linear_full_kl(
    policy_hidden: Tensor,
    policy_weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    *,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    reverse_weight: float = 0.0,
) -> Tensor:
    out = full_kl(
        policy_hidden @ policy_weight.t(), ref_hidden @ ref_weight.t(),
        mask=mask, temperature=temperature, reduction=reduction, reverse_weight=reverse_weight,
    )
    return out
