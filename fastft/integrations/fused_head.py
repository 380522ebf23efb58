"""Any function of a causal LM's output-layer operands, computed inside the model's own forward.

The fused heads of :mod:`fastft.rl` (``token_logprobs``, ``distillation_loss``) and the loss of
:mod:`fastft.integrations.causal_lm_loss` read the final hidden states and the head's weight, never the
[tokens x vocab] logits. Reading ``lm_head.weight`` after the forward is wrong in three cases this module
covers: an FSDP2-sharded head (its weight is whole only while the model's forward runs: outside it is a
shard), a LoRA'd head (it computes more than ``h @ W.T``) and a model that transforms its logits (Gemma-2's
soft cap, Cohere's and Granite's scaling). :func:`call_with_fused_head` runs the model's forward --
through any DDP / FSDP / PEFT wrapper, so every hook fires -- with the output layer's call replaced, for
this one forward, by ``head_fn(HeadOperands)``: the operands are taken at that moment (the weight is the
unsharded one; a LoRA'd head's operands are widened by its low-rank coordinates, as in
``fastft.integrations._head``), and ``head_fn``'s tensor is what the layer returns. So the result is an
output of the forward (FSDP2 registers its backward hooks on it) and the model's post-processing of
"logits" (slicing, an upcast) runs on a tensor of ``head_fn``'s making, not on [tokens x vocab] logits.

Scaling transforms are folded into the operands ((m h) W^T + m b = m (h W^T + b)); a soft cap is handed to
``head_fn`` (``HeadOperands.softcap``) to apply through its op's ``softcap`` option, and the model's own
cap then runs on ``head_fn``'s result, which :func:`call_with_fused_head` ignores: it returns what
``head_fn`` returned, captured inside the call.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor, nn

from ..tuners.base import unwrap
from ._head import head_operands, logit_transforms, unsupported_reason

__all__ = ["HeadOperands", "call_with_fused_head", "fused_head_unsupported", "output_layer"]


@dataclass(frozen=True)
class HeadOperands:
    """What the output layer was called with, as operands of one fused op:
    ``logits = softcap(F.linear(input, weight, bias))`` (no cap when ``softcap`` is None)."""

    hidden: Tensor  # the final hidden states the layer was called on [..., H] (for a value head, say)
    input: Tensor  # hidden, widened by a LoRA'd head's coordinates and times the logit multiplier [..., H']
    weight: Tensor  # [V, H']: the whole weight (unsharded under FSDP2), widened by LoRA's B
    bias: Optional[Tensor]  # [V] or None (times the logit multiplier)
    softcap: Optional[float]  # the model's final logit soft cap (Gemma-2/3), or None


def _model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP (``.module``) and PEFT wrappers."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return unwrap(inner)


def output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The model's output layer (``get_output_embeddings()``), through DDP and PEFT wrappers; None if it has
    none."""
    inner = _model_of(model)
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


def fused_head_unsupported(model: nn.Module) -> Optional[str]:
    """Why :func:`call_with_fused_head` cannot run on ``model`` (None: it can): the output layer is missing,
    or is neither a plain ``nn.Linear`` (FSDP2's subclass of it included) nor one with a single LoRA adapter."""
    head = output_layer(model)
    if head is None:
        return f"{type(_model_of(model)).__name__} has no output layer (get_output_embeddings)"
    return unsupported_reason(head)


def call_with_fused_head(model: nn.Module, head_fn: Callable[[HeadOperands], Any], /, **forward_kwargs) -> Any:
    """``head_fn(operands)`` computed inside ``model(**forward_kwargs)`` where the output layer runs (see the
    module docstring), and returned. ``head_fn`` should return a tensor (or a tuple whose first item is the
    one a loss differentiates): it is what the layer hands back to the model's forward. The forward's
    other outputs are dropped; pass no ``labels`` (the loss would be computed on ``head_fn``'s result).
    Raises TypeError naming the reason when the output layer cannot be fused (:func:`fused_head_unsupported`),
    and RuntimeError when the forward does not call its output layer exactly once."""
    reason = fused_head_unsupported(model)
    if reason is not None:
        raise TypeError(f"call_with_fused_head: {reason}")
    if "labels" in forward_kwargs:
        raise ValueError("call_with_fused_head takes no labels: head_fn computes what the head's loss would")
    inner = _model_of(model)
    head = inner.get_output_embeddings()
    softcap, multiplier = logit_transforms(inner)
    results: list = []

    def fused_forward(layer, hidden: Tensor):
        if results:
            raise RuntimeError(f"{type(inner).__name__} called its output layer twice in one forward; "
                               "call_with_fused_head cannot tell which call to fuse")
        widened, weight, bias = head_operands(layer, hidden)
        if multiplier is not None:
            widened = widened * multiplier
            bias = bias * multiplier if bias is not None else None
        results.append(head_fn(HeadOperands(hidden, widened, weight, bias, softcap)))
        out = results[0]
        return out[0] if isinstance(out, tuple) else out

    had_own = "forward" in vars(head)
    own = vars(head).get("forward")
    head.forward = types.MethodType(fused_forward, head)
    try:
        model(**forward_kwargs)
    finally:
        if had_own:
            head.forward = own
        else:
            del head.forward
    if not results:
        raise RuntimeError(f"{type(inner).__name__}'s forward never called its output layer")
    return results[0]
