"""The op database of the generic suite (tests/ops/test_ops_generic.py): per registered op (fastft.ops.registry), how
to call it on small inputs, what the right answer is, and which inputs it must refuse.

OP_DB[name] is an OpInfo:
  samples(dtype, device) -> [Sample]   tiny, odd shapes (the Triton interpreter is slow); tensors with
                                       requires_grad are the leaves whose gradients are checked, the first
                                       output is what is compared.
  truth(*args, **kwargs)               plain torch with the functional's signature: run in fp64 it is the exact
                                       answer, run in the sample's dtype it gives torch's own error for the
                                       2x-torch-error rule (docs/ARCHITECTURE.md, "Tests").
  bad_inputs(device) -> [BadInput]     calls that must raise a named error.
  dtypes                               the input dtypes the op takes.
The CUDA tests (tests/cuda/) use the same truths. The data lived inside the library's op modules before;
the library keeps only what it needs (fastft.ops.registry: name, functional, defined op, benchmark).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Sample:
    """One call: ``functional(*args, **kwargs)``."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True)
class BadInput:
    """A call that must raise ``error`` with a message matching ``match`` (a regex)."""

    args: tuple
    kwargs: dict
    error: type
    match: str


@dataclass(frozen=True)
class OpInfo:
    samples: Callable
    truth: Callable
    bad_inputs: Callable
    dtypes: tuple = FLOAT_DTYPES


def float_like(t, dtype: torch.dtype):
    """``t`` (a tensor or a nested tuple/list/dict of them) with floating tensors cast to ``dtype`` as new
    leaves (requires_grad kept); others unchanged."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            return t
        return t.detach().to(dtype).requires_grad_(t.requires_grad)
    if isinstance(t, (tuple, list)):
        return type(t)(float_like(x, dtype) for x in t)
    if isinstance(t, dict):
        return {k: float_like(v, dtype) for k, v in t.items()}
    return t


def masked_reduction(per_token, mask, reduction: str):
    """fastft's token reductions in plain torch: mask zeroes tokens, "mean" over counted ones."""
    if mask is not None:
        per_token = per_token * (mask != 0).to(per_token.dtype)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (per_token.numel() if mask is None else (mask != 0).sum())


# ------------------------------------------------------------------------------------------------
# cross_entropy
# ------------------------------------------------------------------------------------------------


def cross_entropy_truth(input, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
           softcap=None):
    x = input if softcap is None else softcap * torch.tanh(input / softcap)
    weight = weight.to(x.dtype) if weight is not None else None
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), target.reshape(-1), weight, ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        counted = (target.reshape(-1) != ignore_index).to(x.dtype)
        loss = loss + z_loss * torch.logsumexp(x.reshape(-1, x.shape[-1]), -1).square() * counted
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    counted = target.reshape(-1) != ignore_index
    w = weight[target.reshape(-1).clamp(min=0)] if weight is not None else torch.ones_like(loss)
    return loss.sum() / (w * counted).sum()


def cross_entropy_samples(dtype, device):
    n, v = 13, 37  # odd: partial tiles everywhere
    x = (torch.randn(n, v, device=device) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    t[::4] = -100
    w = torch.rand(v, device=device) + 0.5
    return [
        Sample((x, t), {}, "mean"),
        Sample((x, t), {"reduction": "none", "label_smoothing": 0.1}, "none+smoothing"),
        Sample((x, t, w), {"reduction": "sum", "z_loss": 1e-3, "softcap": 5.0}, "weights+zloss+softcap"),
    ]


def cross_entropy_bad_inputs(device):
    x = torch.randn(4, 5, device=device)
    t = torch.zeros(4, dtype=torch.int64, device=device)
    bad = BadInput
    return [
        bad((x, torch.tensor([0, 1, 5, 2], device=device)), {}, ValueError, "out of range"),
        bad((x, torch.tensor([0, -3, 1, 2], device=device)), {}, ValueError, "out of range"),
        bad((x, t.float()), {}, TypeError, "integer class indices"),
        bad((x, t[:3]), {}, ValueError, "target shape"),
        bad((torch.randn(2, 5, 3, device=device), torch.zeros(2, 3, dtype=torch.int64, device=device)), {}, ValueError,
            "LAST"),
        bad((x.int(), t), {}, TypeError, "input must be one of"),
        bad((x, t.to("meta")), {}, ValueError, "target is on meta"),
        bad((x, t), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        bad((x, t), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        bad((x, t), {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        bad((x, t), {"z_loss": -1.0}, ValueError, "z_loss"),
        bad((x, t), {"softcap": 0.0}, ValueError, "softcap"),
        bad((x, t, torch.ones(4, device=device)), {}, ValueError, "weight"),
        bad((x, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
    ]


# ------------------------------------------------------------------------------------------------
# linear_cross_entropy
# ------------------------------------------------------------------------------------------------


def linear_cross_entropy_truth(input, linear_weight, target, *, linear_bias=None, chunk_size=None, **kw):
    return cross_entropy_truth(F.linear(input, linear_weight, linear_bias), target, **kw)


def linear_head_inputs(dtype, device, n=11, h=19, v=37):
    """(hidden [n, h], weight [v, h], bias [v], targets [n] with every third -100) of the linear-head samples."""
    x = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device=device) / h ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, device=device) * 0.1).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    t[::3] = -100
    return x, w, b, t


def linear_cross_entropy_samples(dtype, device):
    x, w, b, t = linear_head_inputs(dtype, device)
    return [
        Sample((x, w, t), {"chunk_size": 4}, "mean, 3 chunks"),
        Sample((x, w, t), {"linear_bias": b, "reduction": "none", "label_smoothing": 0.1}, "none+bias"),
        Sample((x.detach(), w, t), {"reduction": "sum", "z_loss": 1e-3, "softcap": 4.0}, "frozen input"),
    ]


def linear_head_bad_inputs(device, weight_name: str, bias_name: str, integer_message: str):
    """(hidden, weight, target, the bad inputs every linear head refuses): the functional's arguments named
    ``weight_name`` / ``bias_name`` (keyword) in its messages."""
    x = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    t = torch.zeros(4, dtype=torch.int64, device=device)
    bad = BadInput
    return x, w, t, [
        bad((x, torch.randn(10, 7, device=device), t), {}, ValueError, r"hidden size mismatch.*\(4, 8\).*\(10, 7\)"),
        bad((x, w, t), {bias_name: torch.randn(9, device=device)}, ValueError, bias_name + r" shape \(9,\).*\(10,\)"),
        bad((torch.randn(2, 3, 8, device=device), w, torch.zeros(6, dtype=torch.int64, device=device)), {},
            ValueError, r"target shape \(6,\).*\(2, 3\)"),
        bad((x, torch.randn(10, 8, 2, device=device), t), {}, ValueError, f"{weight_name} must be 2-D"),
        bad((x, w.double(), t), {}, TypeError, f"{weight_name} dtype"),
        bad((x, w, t.float()), {}, TypeError, integer_message),
        bad((x, w, torch.full((4,), 10, device=device)), {}, ValueError, "out of range"),
        bad((x, w, t), {"chunk_size": 0}, ValueError, "chunk_size"),
        bad((x, w.to("meta"), t), {}, ValueError, f"{weight_name} is on meta"),
    ]


def linear_cross_entropy_bad_inputs(device):
    x, w, t, common = linear_head_bad_inputs(device, "linear_weight", "linear_bias", "integer class indices")
    bad = BadInput
    return common + [
        bad((x, w, t), {"weight": torch.rand(9, device=device)}, ValueError, r"weight.*\(10,\)"),
        bad((x, w, t), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        bad((x, w, t), {"softcap": -1.0}, ValueError, "softcap"),
    ]


# ------------------------------------------------------------------------------------------------
# full_kl
# ------------------------------------------------------------------------------------------------


def full_kl_truth(policy_logits, ref_logits, *, mask=None, temperature=1.0, reduction="mean", reverse_weight=0.0):
    """Plain torch (1 - w) KL(p || r) + w KL(r || p), p = softmax(policy/T), r = softmax(ref/T), per token with
    fastft's mask/reduction rules (w = reverse_weight)."""
    logp = torch.log_softmax(policy_logits / temperature, -1)
    logr = torch.log_softmax(ref_logits / temperature, -1)
    per_token = ((1 - reverse_weight) * logp.exp() * (logp - logr) + reverse_weight * logr.exp() * (logr - logp))
    return masked_reduction(per_token.sum(-1), mask, reduction)


def full_kl_samples(dtype, device):
    n, v = 2, 37
    p = (torch.randn(n, 5, v, device=device) * 2).to(dtype).requires_grad_()
    r = (torch.randn(n, 5, v, device=device) * 2).to(dtype).requires_grad_()
    mask = torch.rand(n, 5, device=device) > 0.3
    return [
        Sample((p, r.detach()), {}, "mean"),
        Sample((p, r), {"mask": mask, "reduction": "none", "temperature": 0.7}, "none+mask, both grads"),
        Sample((p, r.detach()), {"mask": mask, "reduction": "sum"}, "sum+mask"),
        Sample((p, r), {"mask": mask, "reduction": "none", "reverse_weight": 0.3}, "none+mask, w=0.3, both grads"),
        Sample((p, r), {"reverse_weight": 0.6, "temperature": 1.3}, "mean, w=0.6, both grads"),
    ]


def full_kl_bad_inputs(device):
    p = torch.randn(4, 10, device=device)
    bad = BadInput
    return [
        bad((p, torch.randn(4, 11, device=device)), {}, ValueError, "vocabulary sizes differ"),
        bad((p, torch.randn(5, 10, device=device)), {}, ValueError, "same shape"),
        bad((p, p), {"mask": torch.ones(5, dtype=torch.bool, device=device)}, ValueError, "mask shape"),
        bad((p, p), {"temperature": 0.0}, ValueError, "temperature"),
        bad((p, p), {"temperature": -1.0}, ValueError, "temperature"),
        bad((p, p), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        bad((p, p), {"reverse_weight": 1.5}, ValueError, "reverse_weight"),
        bad((p, p), {"reverse_weight": -0.1}, ValueError, "reverse_weight"),
        bad((p, p.to("meta")), {}, ValueError, "ref_logits is on meta"),
        bad((p.long(), p), {}, TypeError, "policy_logits"),
        bad((p, [[0.0] * 10] * 4), {}, TypeError, "ref_logits"),
    ]


# ------------------------------------------------------------------------------------------------
# selective_log_softmax
# ------------------------------------------------------------------------------------------------


def soft_capped(logits, softcap=None):
    """Gemma-2/3's logit soft cap ``c * tanh(logits / c)`` in plain torch (None: the logits unchanged)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def selective_log_softmax_truth(logits, index, *, temperature=1.0, softcap=None):
    return torch.log_softmax(soft_capped(logits, softcap) / temperature, -1).gather(-1, index[..., None])[..., 0]


def selective_log_softmax_samples(dtype, device):
    x = (torch.randn(3, 5, 37, device=device) * 3).to(dtype).requires_grad_()
    idx = torch.randint(0, 37, (3, 5), device=device)
    return [Sample((x, idx), {}, "T=1"), Sample((x, idx.int()), {"temperature": 0.6}, "T=0.6"),
            Sample((x, idx), {"temperature": 0.6, "softcap": 2.5}, "softcap 2.5, T=0.6")]


def selective_log_softmax_bad_inputs(device):
    x = torch.randn(4, 10, device=device)
    idx = torch.zeros(4, dtype=torch.int64, device=device)
    bad = BadInput
    return [
        bad((x, torch.zeros(5, dtype=torch.int64, device=device)), {}, ValueError, "index shape"),
        bad((x, torch.tensor([0, 1, 10, 2], device=device)), {}, ValueError, "out of range"),
        bad((x, idx), {"temperature": 0}, ValueError, "temperature"),
        bad((x, idx), {"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
        bad((x, idx), {"softcap": float("nan")}, ValueError, "softcap"),
        bad((x, idx), {"softcap": "30"}, TypeError, "softcap must be a Python number"),
        bad((x, idx.float()), {}, TypeError, "integer"),
        bad((x, idx.to("meta")), {}, ValueError, "index is on meta"),
    ]


# ------------------------------------------------------------------------------------------------
# linear_selective_log_softmax
# ------------------------------------------------------------------------------------------------


def log_softmax_entropy_truth(logits, temperature=1.0):
    """(log_softmax(logits / T), entropy) in plain torch, in the logits' dtype; p = 0 tokens count 0."""
    logp = torch.log_softmax(logits / temperature, -1)
    p = logp.exp()
    return logp, -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def linear_selective_log_softmax_truth(hidden, weight, target, *, bias=None, temperature=1.0, softcap=None,
                                       ignore_index=-100, chunk_size=None, return_entropy=False):
    """Computed in the inputs' dtype (torch's own error), returned as fastft's: fp32 (fp64 for fp64)."""
    logp, entropy = log_softmax_entropy_truth(soft_capped(F.linear(hidden, weight, bias), softcap), temperature)
    counted = target != ignore_index
    picked = logp.gather(-1, torch.where(counted, target, 0).long()[..., None])[..., 0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    picked, entropy = (torch.where(counted, t, zero).to(acc) for t in (picked, entropy))
    return (picked, entropy) if return_entropy else picked


def linear_selective_log_softmax_samples(dtype, device):
    x, w, b, t = linear_head_inputs(dtype, device)
    n, h = x.shape
    return [
        Sample((x, w, t), {"chunk_size": 4}, "3 chunks"),
        Sample((x, w, t), {"bias": b, "temperature": 0.7}, "bias, T=0.7"),
        Sample((x, w, t), {"bias": b, "temperature": 0.7, "softcap": 1.5, "chunk_size": 4},
               "softcap 1.5, bias, T=0.7, 3 chunks"),
        Sample((x.detach().view(1, n, h), w, torch.where(t == -100, 5, t).view(1, n)), {"ignore_index": 5},
               "frozen input, [1, N], ignore_index=5"),
    ]


def linear_selective_log_softmax_bad_inputs(device):
    x, w, t, common = linear_head_bad_inputs(device, "weight", "bias", "integer")
    bad = BadInput
    return common + [
        bad((x, w, t), {"temperature": 0.0}, ValueError, "temperature"),
        bad((x, w, t), {"softcap": -30.0}, ValueError, "softcap must be a finite number > 0"),
        bad((x, w, t), {"softcap": float("inf")}, ValueError, "softcap"),
        bad((x, w, t), {"softcap": True}, TypeError, "softcap must be a Python number"),
        bad((x, w, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        bad((x, w, t), {"return_entropy": 1}, TypeError, "return_entropy"),
    ]


# ------------------------------------------------------------------------------------------------
# kl_penalty
# ------------------------------------------------------------------------------------------------


def kl_penalty_truth(logprobs, ref_logprobs, *, estimator="k3", mask=None, reduction="none"):
    d = logprobs - ref_logprobs
    per_token = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) + d - 1, "abs": d.abs()}[estimator]
    return masked_reduction(per_token, mask, reduction)


def kl_penalty_samples(dtype, device):
    lp = (-torch.rand(3, 7, device=device) * 4).to(dtype).requires_grad_()
    rp = (-torch.rand(3, 7, device=device) * 4).to(dtype).requires_grad_()
    mask = torch.rand(3, 7, device=device) > 0.3
    return [Sample((lp, rp), {"estimator": e, "mask": mask, "reduction": r}, f"{e}/{r}")
            for e, r in (("k1", "none"), ("k2", "sum"), ("k3", "mean"), ("abs", "none"))]


def kl_penalty_bad_inputs(device):
    a = torch.randn(3, 5, device=device)
    bad = BadInput
    return [
        bad((a, a), {"estimator": "k4"}, ValueError, "estimator must be one of"),
        bad((a, a[:2]), {}, ValueError, "same shape"),
        bad((a, a), {"mask": torch.ones(3, dtype=torch.bool, device=device)}, ValueError, "mask shape"),
        bad((a, a), {"reduction": "batchmean"}, ValueError, "reduction must be one of"),
        bad((a, a.to("meta")), {}, ValueError, "ref_logprobs is on meta"),
    ]


# ------------------------------------------------------------------------------------------------
# linear_full_kl
# ------------------------------------------------------------------------------------------------


def linear_full_kl_truth(policy_hidden, policy_weight, ref_hidden, ref_weight, *, chunk_size=None, **kw):
    return full_kl_truth(policy_hidden @ policy_weight.t(), ref_hidden @ ref_weight.t(), **kw)


def linear_full_kl_samples(dtype, device):
    n, h, h_ref, v = 11, 13, 9, 37
    hp = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    wp = (torch.randn(v, h, device=device) / h ** 0.5 * 2).to(dtype).requires_grad_()
    hr = torch.randn(n, h_ref, device=device).to(dtype)
    wr = (torch.randn(v, h_ref, device=device) / h_ref ** 0.5 * 2).to(dtype)
    mask = torch.rand(n, device=device) > 0.3
    wr_leaf = wr.detach().clone().requires_grad_()
    return [
        Sample((hp, wp, hr, wr), {"chunk_size": 4}, "mean, 3 chunks"),
        Sample((hp, wp, hr.requires_grad_(), wr), {"mask": mask, "reduction": "none", "temperature": 0.8},
                        "none+mask"),
        Sample((hp, wp.detach(), hr.detach(), wr), {"mask": mask, "reduction": "sum", "chunk_size": 5},
                        "sum+mask, frozen head"),
        Sample((hp, wp, hr, wr_leaf), {"mask": mask, "reduction": "none", "chunk_size": 4, "reverse_weight": 0.3},
               "none+mask, w=0.3, 3 chunks, all four grads"),
        Sample((hp.detach(), wp.detach(), hr.detach(), wr_leaf), {"reverse_weight": 1.0},
               "mean, w=1, grads to the ref head only"),
    ]


def linear_full_kl_bad_inputs(device):
    hp, wp = torch.randn(4, 8, device=device), torch.randn(50, 8, device=device)
    hr, wr = torch.randn(4, 6, device=device), torch.randn(50, 6, device=device)
    bad = BadInput
    return [
        bad((hp, wp, hr, wr[:49]), {}, ValueError, "vocabulary sizes differ"),
        bad((hp, wp, hr[:, :5], wr), {}, ValueError, "hidden size"),
        bad((hp, wp, hr[:3], wr), {}, ValueError, "token shape"),
        bad((hp, wp, hr, wr), {"mask": torch.ones(5, dtype=torch.bool, device=device)}, ValueError, "mask shape"),
        bad((hp, wp, hr, wr), {"temperature": float("nan")}, ValueError, "temperature"),
        bad((hp, wp, hr, wr), {"reverse_weight": float("nan")}, ValueError, "reverse_weight"),
        bad((hp, wp, hr, wr), {"chunk_size": 0}, ValueError, "chunk_size"),
        bad((hp, wp, hr, wr), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        bad((hp, wp, hr, wr.to("meta")), {}, ValueError, "ref_weight is on meta"),
    ]


# ------------------------------------------------------------------------------------------------
# lora_linear
# ------------------------------------------------------------------------------------------------


def lora_linear_truth(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=True, seed=None):
    return torch.nn.functional.linear(x, weight, bias) + scaling * (x @ lora_A.t().to(x.dtype)) @ lora_B.t().to(x.dtype)


def lora_linear_samples(dtype, device):
    n, d_in, d_out, r = 13, 23, 19, 5
    x = torch.randn(n, d_in, device=device).to(dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, device=device) / d_in ** 0.5).to(dtype)
    b = (torch.randn(d_out, device=device) * 0.1).to(dtype)
    a = (torch.randn(r, d_in, device=device) / d_in ** 0.5).to(dtype).requires_grad_()
    bb = (torch.randn(d_out, r, device=device) * 0.2).to(dtype).requires_grad_()
    return [
        Sample((x, w, b, a, bb, 2.0), {}, "frozen base"),
        Sample((x.detach().reshape(1, n, d_in), w.requires_grad_(), None, a, bb, 0.5), {},
                        "3-D x, trainable W, no bias"),
    ]


def lora_linear_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(6, 8, device=device)
    b = torch.randn(6, device=device)
    a = torch.randn(2, 8, device=device)
    bb = torch.randn(6, 2, device=device)
    bad = BadInput
    return [
        bad((x, w, b, a, bb, 1.0), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        bad((torch.randn(4, 9, device=device), w, b, a, bb, 1.0), {}, ValueError, "features"),
        bad((x, w, b, torch.randn(2, 9, device=device), bb, 1.0), {}, ValueError, "lora_A"),
        bad((x, w, b, a, torch.randn(6, 3, device=device), 1.0), {}, ValueError, "lora_B must have shape"),
        bad((x, w, torch.randn(5, device=device), a, bb, 1.0), {}, ValueError, "bias"),
        bad((x, w.double(), b, a, bb, 1.0), {}, TypeError, "weight dtype"),
        bad((x.long(), w, b, a, bb, 1.0), {}, TypeError, "x must be one of"),
        bad((x, w, b, a, bb, float("nan")), {}, ValueError, "scaling"),
        bad((x, w, b, torch.randn(0, 8, device=device), torch.randn(6, 0, device=device), 1.0), {}, ValueError,
            "rank 0"),
        bad((x, w, b, a.to("meta"), bb, 1.0), {}, ValueError, "lora_A is on meta"),
    ]


# ------------------------------------------------------------------------------------------------
# adapter
# ------------------------------------------------------------------------------------------------


ADAPTER_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                      "silu": F.silu}


def adapter_truth(x, down_weight, down_bias, up_weight, up_bias, *, activation="relu", dropout_p=0.0, training=True,
           scale=1.0):
    h = ADAPTER_ACTIVATIONS[activation](F.linear(x, down_weight, down_bias))
    return x + scale * F.linear(h, up_weight, up_bias)


def adapter_samples(dtype, device):
    n, hidden, r = 13, 21, 6
    x = torch.randn(n, hidden, device=device).to(dtype).requires_grad_()
    wd = (torch.randn(r, hidden, device=device) / hidden ** 0.5).to(dtype).requires_grad_()
    bd = (torch.randn(r, device=device) * 0.1).to(dtype).requires_grad_()
    wu = (torch.randn(hidden, r, device=device) / r ** 0.5).to(dtype).requires_grad_()
    bu = (torch.randn(hidden, device=device) * 0.1).to(dtype).requires_grad_()
    return [
        Sample((x, wd, bd, wu, bu), {"activation": "gelu", "scale": 0.5}, "gelu, biases"),
        Sample((x.detach().reshape(1, n, hidden), wd, None, wu, None), {"activation": "silu"},
                        "3-D x, silu, no biases"),
    ]


def adapter_bad_inputs(device):
    x = torch.randn(4, 16, device=device)
    wd, bd = torch.randn(4, 16, device=device), torch.randn(4, device=device)
    wu, bu = torch.randn(16, 4, device=device), torch.randn(16, device=device)
    bad = BadInput
    return [
        bad((torch.randn(4, 17, device=device), wd, bd, wu, bu), {}, ValueError, "hidden size mismatch"),
        bad((x, wd, bd, torch.randn(16, 5, device=device), bu), {}, ValueError, "hidden size mismatch"),
        bad((x, torch.randn(0, 16, device=device), torch.randn(0, device=device),
             torch.randn(16, 0, device=device), bu), {}, ValueError, "adapter_size"),
        bad((x, wd, torch.randn(5, device=device), wu, bu), {}, ValueError, "down_bias"),
        bad((x, wd.double(), bd, wu, bu), {}, TypeError, "down_weight is torch.float64"),
        bad((x.long(), wd, bd, wu, bu), {}, TypeError, "x must be one of"),
        bad((x, wd, bd, wu.to("meta"), bu), {}, ValueError, "up_weight is on meta"),
        bad((x, wd, bd, wu, bu), {"activation": "tanh"}, ValueError, "unknown activation"),
        bad((x, wd, bd, wu, bu), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        bad((x, wd, bd, wu, bu), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        bad((x, wd, bd, wu, bu), {"scale": float("nan")}, ValueError, "scale"),
    ]


# ------------------------------------------------------------------------------------------------
# rms_norm
# ------------------------------------------------------------------------------------------------


def rms_norm_truth(x, weight, eps=1e-6, *, offset=0.0, casting_mode="llama"):
    """Hugging Face's LlamaRMSNorm / GemmaRMSNorm forward, with the fp32 upcast widened to fp64 for fp64 input."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(wide)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "gemma":
        return (h * (offset + weight.to(wide))).type_as(x)
    return (weight + offset) * h.to(x.dtype)


def rms_norm_samples(dtype, device):
    x = torch.randn(3, 7, 123, device=device).to(dtype).requires_grad_()  # odd rows and hidden size
    w = (1 + 0.1 * torch.randn(123, device=device)).to(dtype).requires_grad_()
    return [
        Sample((x, w), {}, "llama"),
        Sample((x, w), {"eps": 1e-5, "offset": 1.0, "casting_mode": "gemma"}, "gemma"),
    ]


def rms_norm_bad_inputs(device):
    x = torch.randn(4, 6, device=device)
    w = torch.ones(6, device=device)
    bad = BadInput
    return [
        bad((x.int(), w), {}, TypeError, "x must be one of"),
        bad((x, w[:5]), {}, ValueError, "weight has 5 elements"),
        bad((x, w[None]), {}, ValueError, "weight must be 1-D"),
        bad((x, w.to("meta")), {}, ValueError, "weight is on meta"),
        bad((x, w), {"eps": -1.0}, ValueError, "eps"),
        bad((x, w), {"casting_mode": "none"}, ValueError, "casting_mode must be one of"),
    ]


# ------------------------------------------------------------------------------------------------
# swiglu
# ------------------------------------------------------------------------------------------------


def swiglu_truth(gate, up):
    return gate * torch.sigmoid(gate) * up


def swiglu_samples(dtype, device):
    gate = (2 * torch.randn(5, 3, 129, device=device)).to(dtype).requires_grad_()  # odd sizes: partial tiles
    up = torch.randn(5, 3, 129, device=device).to(dtype).requires_grad_()
    return [Sample((gate, up), {}, "3-D"),
            Sample((gate[:, 1], up.transpose(0, 1)[1]), {}, "strided views")]


def swiglu_bad_inputs(device):
    gate = torch.randn(4, 6, device=device)
    bad = BadInput
    return [
        bad((gate.int(), gate), {}, TypeError, "gate must be one of"),
        bad((gate, gate[:, :5]), {}, ValueError, "gate and up must have one shape"),
        bad((gate, gate.double()), {}, TypeError, "up dtype"),
        bad((gate, gate.to("meta")), {}, ValueError, "up is on meta"),
    ]


OP_DB = {
    'cross_entropy': OpInfo(cross_entropy_samples, cross_entropy_truth, cross_entropy_bad_inputs),
    'linear_cross_entropy': OpInfo(linear_cross_entropy_samples, linear_cross_entropy_truth, linear_cross_entropy_bad_inputs),
    'full_kl': OpInfo(full_kl_samples, full_kl_truth, full_kl_bad_inputs),
    'selective_log_softmax': OpInfo(selective_log_softmax_samples, selective_log_softmax_truth, selective_log_softmax_bad_inputs),
    'kl_penalty': OpInfo(kl_penalty_samples, kl_penalty_truth, kl_penalty_bad_inputs),
    'linear_selective_log_softmax': OpInfo(linear_selective_log_softmax_samples, linear_selective_log_softmax_truth,
                                           linear_selective_log_softmax_bad_inputs),
    'linear_full_kl': OpInfo(linear_full_kl_samples, linear_full_kl_truth, linear_full_kl_bad_inputs),
    'lora_linear': OpInfo(lora_linear_samples, lora_linear_truth, lora_linear_bad_inputs),
    'adapter': OpInfo(adapter_samples, adapter_truth, adapter_bad_inputs),
    'rms_norm': OpInfo(rms_norm_samples, rms_norm_truth, rms_norm_bad_inputs),
    'swiglu': OpInfo(swiglu_samples, swiglu_truth, swiglu_bad_inputs),
}


def info(name: str) -> OpInfo:
    """The database entry of a registered op (KeyError naming the missing op: every op needs one)."""
    if name not in OP_DB:
        raise KeyError(f"tests/ops/op_db.py has no entry for the registered op {name!r}; add its samples, truth "
                       "and bad inputs there")
    return OP_DB[name]
