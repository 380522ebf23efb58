"""The KL family for RLHF (PPO / GRPO) and distillation, one module per op:

  fastft.ops.full_kl                 full_kl(policy_logits, ref_logits)   KL(pi || rho) over the vocabulary
  fastft.ops.selective_log_softmax   selective_log_softmax(logits, index) log pi(index), no [N, V] log-softmax
  fastft.ops.kl_penalty              kl_penalty(logprobs, ref_logprobs)   TRL's estimators k1 / k2 / k3 / abs
  fastft.ops.linear_full_kl          linear_full_kl(h_p, W_p, h_r, W_r)   full_kl of two heads, in token chunks
"""
from .full_kl import full_kl
from .kl_penalty import ESTIMATORS, kl_penalty
from .linear_full_kl import linear_full_kl
from .selective_log_softmax import selective_log_softmax

__all__ = ["full_kl", "selective_log_softmax", "kl_penalty", "linear_full_kl", "ESTIMATORS"]
