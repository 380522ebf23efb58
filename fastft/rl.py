"""RLHF losses on fastft's fused heads: log-probs from hidden states (no [N, V] logits), PPO with a value
head (GAE, clipped policy and value losses, an adaptive KL coefficient), DPO, Bradley–Terry reward
modelling and distillation between two models' heads.

    logp = token_logprobs(hidden, lm_head.weight, targets)            # fused linear cross-entropy, negated
    logp, entropy = token_logprobs(hidden, lm_head.weight, targets, return_entropy=True)  # + differentiable entropy
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    pg, stats = ppo_policy_loss(logp, old_logp, adv, mask, clip_range=0.2)
    vf = value_loss(values, old_values, ret, mask, clip_range=0.2)
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta=0.1)
    kl = distillation_loss(student_hidden, student_w, teacher_hidden, teacher_w, mode="forward")

Shapes: per-token tensors are [B, T] with a 0/1 (or bool) ``mask`` of the tokens that count (the sampled
completion); per-sequence tensors are [B]. Reductions follow TRL where TRL has the loss: PPO's losses are
means over the counted tokens of the batch, DPO's a mean over pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import linear_cross_entropy, linear_full_kl, linear_selective_log_softmax

__all__ = ["token_logprobs", "masked_mean", "gae", "ppo_policy_loss", "value_loss", "explained_variance",
           "AdaptiveKLController",
           "dpo_loss", "bradley_terry_loss", "distillation_loss", "DISTILLATION_MODES", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
DISTILLATION_MODES = ("forward", "reverse", "mixed")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {', '.join(f'{n} {s}' for n, s in shapes.items())}")


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                   temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                   chunk_size: Optional[int] = None, return_entropy: bool = False):
    """``log_softmax(softcap(hidden @ weight.T + bias) / temperature).gather(-1, targets)`` per token, fp32, 0
    where ``targets == ignore_index``, computed in token chunks: the [N, V] logits are never held, and
    gradients reach ``hidden``, ``weight`` and ``bias``. ``softcap``: the tanh cap of Gemma-2/3 heads
    (``cap * tanh(z / cap)``), None for none. A model's head as it stands in the model (FSDP2-sharded, LoRA'd,
    scaled) gives its operands through :func:`fastft.integrations.fused_head.call_with_fused_head`.

    Without the entropy: fastft's fused linear cross-entropy (it computes the gradients in forward; the
    temperature is folded into the hidden states and bias, and into the cap: softcap_c(z) / T =
    softcap_{c/T}(z / T)). ``return_entropy=True``: ``(logp, entropy)`` from
    ``fastft.ops.linear_selective_log_softmax``, the entropy ``-sum_v p_v log p_v`` of the same softmax per
    token (0 where ignored), both differentiable through the soft cap too (an entropy bonus trains the policy
    through it)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    if return_entropy:
        return linear_selective_log_softmax(hidden, weight, targets, bias=bias, temperature=temperature,
                                            softcap=softcap, ignore_index=ignore_index, chunk_size=chunk_size,
                                            return_entropy=True)
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = None if bias is None else bias / temperature
        softcap = None if softcap is None else softcap / temperature
    nll = linear_cross_entropy(hidden, weight, targets, linear_bias=bias, ignore_index=ignore_index,
                               reduction="none", softcap=softcap, chunk_size=chunk_size, loss_dtype=torch.float32)
    return -nll


def masked_mean(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (0 where none is)."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp_min(1)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over each sequence's counted tokens.

    ``rewards``, ``values``, ``mask``: [B, T]; the value after a sequence's last counted token is 0 (the
    episode ends there). Returns (advantages, returns = advantages + values), 0 outside the mask."""
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma!r}, lam={lam!r}")
    m = mask.to(values.dtype)
    rewards, values = rewards.to(values.dtype) * m, values * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # a masked position (padding after the end, or before the completion) passes nothing back
        running = running * m[:, t]
        advantages[:, t] = running
        next_value = values[:, t]  # 0 at a masked position: the episode ends there
    return advantages, (advantages + values) * m


@dataclass(frozen=True)
class PolicyLossStats:
    clip_fraction: float   # share of counted tokens whose ratio left [1 - clip, 1 + clip] on the binding side
    approx_kl: float       # mean of (ratio - 1) - log ratio (k3 of the new policy against the sampling one)
    ratio_mean: float


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    clip_range: float = 0.2) -> tuple[Tensor, PolicyLossStats]:
    """PPO's clipped surrogate (Schulman et al. 2017): ``mean over counted tokens of
    max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(logp - old_logp)``."""
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}")
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():  # one device-to-host copy for the three statistics, not one sync each
        clip_fraction, approx_kl, ratio_mean = torch.stack([
            masked_mean((clipped > unclipped).to(ratio.dtype), mask), masked_mean(ratio - 1 - log_ratio, mask),
            masked_mean(ratio, mask)]).tolist()
    return loss, PolicyLossStats(clip_fraction, approx_kl, ratio_mean)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip_range: Optional[float] = 0.2) -> Tensor:
    """PPO's value loss: ``0.5 * mean over counted tokens of max((v - R)^2, (v_clipped - R)^2)`` with
    ``v_clipped = old_v + clip(v - old_v, -eps, eps)``; ``clip_range=None``: the plain squared error."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    returns = returns.detach()
    error = (values - returns) ** 2
    if clip_range is not None:
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0 or None, got {clip_range!r}")
        old_values = old_values.detach()
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * masked_mean(error, mask)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the counted tokens (TRL's ``val/var_explained``):
    1 when the values predict the returns, 0 for a constant guess at their mean, negative when worse. Unlike
    the value loss it does not grow with the returns' own spread (e.g. a KL penalty that grows during a run).
    NaN when the returns do not vary (nothing to explain)."""
    _check_same_shape(values=values, returns=returns, mask=mask)
    returns = returns.double()  # small: the [B, T] of a rollout
    spread = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    error = returns - values.double()
    residual = masked_mean((error - masked_mean(error, mask)) ** 2, mask)
    return float(1.0 - residual / spread) if spread > 0 else float("nan")


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. 2019: moved towards the value that keeps the measured KL near
    ``target`` (proportional error clipped to ±0.2, scaled by the steps seen over ``horizon``)."""

    def __init__(self, init_coef: float, target: float, horizon: int = 10000):
        if init_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"need init_coef >= 0, target > 0 and horizon > 0, got {init_coef}, {target}, {horizon}")
        self.coef, self.target, self.horizon = float(init_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Optional[Tensor] = None, rejected_tokens: Optional[Tensor] = None,
             ) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) from summed completion log-probs [B] of policy and reference: returns
    (mean loss, chosen rewards, rejected rewards), rewards = ``beta * (policy - ref)`` (detached), as TRL's
    DPOTrainer. ``loss_type``: ``sigmoid`` (with ``label_smoothing``: the conservative DPO of Mitchell 2023),
    ``hinge`` (SLiC), ``ipo`` (Azar et al. 2023; TRL normalizes each log-ratio by the completion's token
    count, so ``chosen_tokens`` / ``rejected_tokens`` are required)."""
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                      ref_rejected=ref_rejected)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    chosen_ratio = policy_chosen - ref_chosen.detach()
    rejected_ratio = policy_rejected - ref_rejected.detach()
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' needs chosen_tokens and rejected_tokens (completion token counts)")
        delta = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        delta = chosen_ratio - rejected_ratio
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
        else:
            losses = torch.relu(1 - beta * delta)
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor] = None) -> Tensor:
    """The reward model's pairwise loss ``-log sigmoid(s_chosen - s_rejected [- margin])``, mean over pairs
    (TRL's RewardTrainer)."""
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    delta = chosen_scores - rejected_scores
    if margin is not None:
        delta = delta - margin
    return -F.logsigmoid(delta).mean()


def distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                      *, mode: str = "forward", mix: float = 0.5, mask: Optional[Tensor] = None,
                      temperature: float = 1.0, chunk_size: Optional[int] = None) -> Tensor:
    """Token-level KL between a teacher's and a student's next-token distributions straight from both
    models' final hidden states and head weights (fastft.ops.linear_full_kl: chunked, neither [N, V] logits
    held), mean over the counted tokens. ``mode``: ``forward`` = KL(teacher || student) (mode-covering,
    the classic distillation loss), ``reverse`` = KL(student || teacher) (mode-seeking, MiniLLM), ``mixed``
    = ``mix * forward + (1 - mix) * reverse``, both directions from ONE linear_full_kl pass (one pair of head
    GEMMs and one kernel sweep per chunk: ``reverse_weight = 1 - mix`` with the teacher as its "policy").
    Gradients reach the student's inputs only (the teacher's are detached)."""
    if mode not in DISTILLATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(DISTILLATION_MODES)}, got {mode!r}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix!r}")
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    kwargs = dict(mask=mask, temperature=temperature, reduction="mean", chunk_size=chunk_size)
    if mode == "reverse":
        return linear_full_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, **kwargs)
    # forward KL(teacher || student) has the teacher as full_kl's "policy"; the kernel's gradient to its
    # "reference" side is the student's
    reverse_weight = 0.0 if mode == "forward" else 1.0 - mix
    return linear_full_kl(teacher_hidden, teacher_weight, student_hidden, student_weight,
                          reverse_weight=reverse_weight, **kwargs)
