"""Cross-entropy with ignore_index, class weights, label smoothing, z-loss and logit softcapping.

Per counted row i with target y, softcapped logits x (x <- s*tanh(x/s) when softcap=s),
lse = logsumexp(x), class weights w (all ones when absent), W = sum(w), eps = label_smoothing:

    loss_i = (1-eps) * w_y * (lse - x_y) + (eps/V) * sum_c w_c * (lse - x_c) + z_loss * lse^2

Ignored rows (y == ignore_index) contribute 0. "mean" divides the sum by sum_i w_{y_i} over counted
rows (torch's convention); with no counted row it returns 0 (torch returns NaN). Ignored rows are never
read: their gradient is 0 whatever they hold. -inf logits are classes of probability 0; a target whose
logit is -inf gives loss +inf (and the finite gradient p - onehot); a counted row with no finite logit
gives NaN, as do NaN and +inf logits (as in torch). The class dimension
is the last one. Math in fp32 (fp64 for fp64 input); the result has the input's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    num_classes = input.shape[-1]
    x = input.reshape(-1, num_classes).to(acc)
    t = target.reshape(-1)
    counted = t != ignore_index
    # Ignored rows are not part of the loss, whatever they hold: zeroing them first keeps an all -inf
    # (or NaN) padding row from putting NaN into the gradient through logsumexp's backward.
    x = torch.where(counted[:, None], x, torch.zeros((), dtype=acc, device=x.device))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    safe_t = torch.where(counted, t, torch.zeros_like(t))
    lse = torch.logsumexp(x, dim=-1)
    x_t = x.gather(1, safe_t[:, None]).squeeze(1)
    w = weight.to(acc) if weight is not None else None
    w_t = w[safe_t] if w is not None else torch.ones_like(lse)
    loss = (1.0 - label_smoothing) * w_t * (lse - x_t)
    if label_smoothing > 0:
        if w is None:
            smooth = num_classes * lse - x.sum(-1)
        else:
            smooth = w.sum() * lse - (x * w).sum(-1)
        loss = loss + (label_smoothing / num_classes) * smooth
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape).to(input.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(input.dtype)
    denom = torch.where(counted, w_t, torch.zeros_like(w_t)).sum()
    # "no counted row" is the count, not the sign of sum(w_y): negative class weights are legal in torch.
    any_counted = counted.any()
    safe = torch.where(any_counted, denom, torch.ones_like(denom))
    return torch.where(any_counted, total / safe, torch.zeros_like(total)).to(input.dtype)
