"""Hugging Face transformers: causal-LM training loss through fastft's fused linear cross-entropy.

``patch_causal_lm_loss(model)`` makes a ``*ForCausalLM`` model (Llama and any model whose head is
a plain ``nn.Linear`` ``lm_head`` and whose loss is ``self.loss_function`` with standard shifted
labels) compute its training loss with :func:`fastft.ops.linear_cross_entropy`, so the
[tokens x vocab] logits are never built. ``unpatch(model)`` restores it exactly.

How (per instance, nothing global is touched): the model's own forward still runs -- decoder,
``logits_to_keep`` slicing, whatever else it does -- but while a training forward with labels is
in flight, ``lm_head`` hands back its input (the final hidden states) instead of logits and
computes the loss right there, inside lm_head's call (so an FSDP-sharded head is unsharded at that
moment, as for the stock GEMM), and ``self.loss_function`` returns that loss. The output then has
``logits=None`` unless ``return_logits=True`` (at patch time or per call), in which case real
logits are computed too. Same loss as transformers' ``ForCausalLMLoss``: labels shifted left and
padded with ignore_index (or ``shift_labels`` when given), ignore -100, fp32 loss, mean over counted
tokens or ``sum / num_items_in_batch`` when the trainer passes ``num_items_in_batch``.

Logit transforms between lm_head and the loss come from the config's attributes: Gemma-2/3
``final_logit_softcapping`` (the op's ``softcap``), Cohere's ``logit_scale`` and Granite's
``logits_scaling`` (folded into the hidden states: (s h) W^T = s (h W^T)). A forward that changes the
logits although its config names no transform, or leaves them alone although it names one, raises
rather than return a wrong loss. The head may be a plain ``nn.Linear`` or a LoRA'd one (fastft's
``LoRALinear``, PEFT's ``lora.Linear``): see ``fastft.integrations._head``.

When it is used: whenever the forward gets ``labels``, in train and eval mode alike (a validation loss
saves the same memory), with ``logits=None`` unless logits are asked for. The first fused forward of a
patched model logs that once (logger ``fastft.integrations.causal_lm_loss``, level INFO). Code that reads
logits of a labelled forward (``Trainer.evaluate`` with ``compute_metrics``) patches with
``return_logits=True`` or passes ``return_logits=True`` per call. Without labels (generation,
inference) the stock forward runs, untouched.
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import linear_cross_entropy as fused_linear_cross_entropy
from ..tuners.base import unwrap
from ._head import head_operands, logit_transforms
from ._head import unsupported_reason as unsupported_head_reason

__all__ = ["LossPatchInfo", "patch_causal_lm_loss", "patch_info", "unpatch", "is_patched"]

logger = logging.getLogger(__name__)

_STATE_ATTR = "_fastft_causal_lm_loss"


@dataclass
class _PatchState:
    lm_head: nn.Linear
    return_logits: bool
    chunk_size: Optional[int]
    softcap: Optional[float]
    logit_multiplier: Optional[float]
    saved: dict = field(default_factory=dict)  # attribute -> previous instance value, where there was one
    stock_loss: Any = None  # the model's loss_function before the patch (a call outside a patched forward uses it)
    announced: bool = False  # the one-time log line of the first fused forward was written
    # per-call
    active: bool = False
    labels: Any = None
    loss_kwargs: dict = field(default_factory=dict)
    hidden: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    loss_called: bool = False


def is_patched(model: nn.Module) -> bool:
    return _STATE_ATTR in vars(unwrap(model))


@dataclass(frozen=True)
class LossPatchInfo:
    """What :func:`patch_causal_lm_loss` fused on one model (read-only, for reports)."""

    lm_head: nn.Module  # the output layer whose forward the patch intercepts
    softcap: Optional[float]  # the config's final_logit_softcapping, folded into the op
    logit_multiplier: Optional[float]  # Cohere logit_scale / Granite 1/logits_scaling, folded into the hidden states
    previous_forward: Any  # the model's instance forward before the patch (a trainer's wrapper), or None


def patch_info(model: nn.Module) -> Optional[LossPatchInfo]:
    """What the live loss patch of ``model`` fuses (None: not patched)."""
    state = vars(unwrap(model)).get(_STATE_ATTR)
    if state is None:
        return None
    return LossPatchInfo(state.lm_head, state.softcap, state.logit_multiplier, state.saved.get("model.forward"))


def patch_causal_lm_loss(model: nn.Module, *, return_logits: bool = False, chunk_size: Optional[int] = None) -> nn.Module:
    """Route the loss of a causal LM's labelled forward (train and eval) through the fused linear
    cross-entropy (in place; returns ``model``). ``return_logits``: also return logits then (they are built).
    ``chunk_size``: token rows per chunk (default: fastft's memory budget). Idempotent."""
    target = unwrap(model)
    if is_patched(target):
        return model
    lm_head = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None
    if lm_head is None:
        lm_head = getattr(target, "lm_head", None)
    reason = unsupported_head_reason(lm_head) if lm_head is not None else "the model has no output layer"
    if reason is not None:
        raise TypeError(f"patch_causal_lm_loss cannot fuse the head of {type(target).__name__}: {reason}")
    if "_loss_function" in vars(target):
        raise ValueError(
            f"{type(target).__name__} has a custom loss_function set; patch_causal_lm_loss reproduces the standard "
            "causal-LM loss only"
        )
    loss_type = getattr(target, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(f"{type(target).__name__} uses loss_type={loss_type!r}; only 'ForCausalLM' can be fused")
    if "labels" not in inspect.signature(type(target).forward).parameters:
        raise TypeError(f"{type(target).__name__}.forward takes no `labels`: not a causal LM head")
    softcap, multiplier = logit_transforms(target)
    state = _PatchState(lm_head=lm_head, return_logits=bool(return_logits), chunk_size=chunk_size, softcap=softcap,
                        logit_multiplier=multiplier)
    state.stock_loss = target.loss_function
    # Previous instance attributes (e.g. accelerate wraps model.forward per instance): restored by unpatch.
    state.saved = {key: vars(owner)[name] for key, owner, name in
                   (("model.forward", target, "forward"), ("lm_head.forward", lm_head, "forward")) if name in vars(owner)}
    # Everything is reached through the instances (bound methods, state stored on them), so a deepcopy
    # of a patched model (EMA, a DPO reference model) is a patched copy that runs its own weights.
    setattr(target, _STATE_ATTR, state)
    setattr(lm_head, _STATE_ATTR, state)
    target.forward = types.MethodType(_with_signature_of(type(target).forward), target)
    lm_head.forward = types.MethodType(_lm_head_forward, lm_head)
    target.loss_function = types.MethodType(_loss_function, target)  # the property stores it in _loss_function
    return model


def _original_forward(model: nn.Module, state: _PatchState):
    previous = state.saved.get("model.forward")
    return previous if previous is not None else type(model).forward.__get__(model)


def _with_signature_of(class_forward):
    """``_patched_forward`` carrying the model's own forward signature (``__wrapped__``): transformers'
    Trainer keeps only the dataset columns that ``inspect.signature(model.forward)`` names, and
    ``generate`` checks its kwargs against it."""
    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    forward.fastft_patched = True
    return forward


def _patched_forward(self, *args, **kwargs):
    state: _PatchState = vars(self)[_STATE_ATTR]
    original = _original_forward(self, state)
    want_logits = kwargs.pop("return_logits", state.return_logits)
    signature = inspect.signature(type(self).forward)
    bound = signature.bind_partial(self, *args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None:
        return original(*args, **kwargs)
    if self.get_output_embeddings() is not state.lm_head:
        raise RuntimeError(
            f"{type(self).__name__}'s output layer was replaced after its loss was patched (get_peft_model with "
            "lm_head in target_modules?): call fastft.patch(model) again after get_peft_model (it patches what is "
            "new), or train with fastft.integrations.hf_trainer.FastftCallback, which does it at train begin")
    if not state.announced:
        state.announced = True
        logger.info("fastft: %s computes its loss with the fused linear cross-entropy whenever labels are given "
                    "(train and eval); logits are %s", type(self).__name__,
                    "built as well (return_logits)" if want_logits else "not built (output logits=None; pass "
                    "return_logits=True to get them)")
    var_kw = next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    extra = bound.arguments.get(var_kw, {}) if var_kw else {}
    state.labels = labels
    state.loss_kwargs = {k: extra[k] for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in extra}
    state.hidden, state.loss, state.loss_called, state.active = None, None, False, True
    try:
        out = original(*args, **kwargs)
        if not state.loss_called and state.hidden is None:
            # lm_head never ran, so nothing was intercepted: a wrapper computed the loss its own way
            # (TRL's add_fused_lm_head with fused_lm_head=True reads lm_head.weight itself). Its output stands.
            return out
        if not state.loss_called:
            raise RuntimeError(
                f"{type(self).__name__}.forward did not compute its loss through self.loss_function; "
                "fastft.integrations.causal_lm_loss cannot fuse it (call unpatch(model))"
            )
        hidden = state.hidden
    finally:
        state.active = False
        state.hidden = state.labels = state.loss = None
        state.loss_kwargs = {}
    return _replace_logits(out, _real_logits(state, hidden) if want_logits else None)


def _lm_head_forward(head, hidden_states):
    state: _PatchState = vars(head)[_STATE_ATTR]
    if not state.active:
        return _stock_head(state, hidden_states)
    if state.hidden is not None:
        raise RuntimeError("lm_head was called twice in one patched forward; fastft cannot fuse this model")
    state.hidden = hidden_states
    state.loss = _fused_loss(state, hidden_states)
    return hidden_states  # stands in for the logits; dropped from the output


def _loss_function(self, logits, labels, vocab_size=None, **kwargs):
    state: _PatchState = vars(self)[_STATE_ATTR]
    if not state.active:  # eval with labels: the stock loss on the stock logits
        return state.stock_loss(logits, labels, vocab_size, **kwargs)
    if labels is not state.labels:
        raise RuntimeError("the patched model passed different labels to its loss than it was called with")
    transformed = state.softcap is not None or state.logit_multiplier is not None
    if (logits is not state.hidden) != transformed:
        raise RuntimeError(
            f"{type(self).__name__} changes the logits between lm_head and its loss in a way fastft does not "
            "know; call unpatch(model)" if not transformed else
            f"{type(self).__name__}'s config names a logit transform (softcap {state.softcap}, multiplier "
            f"{state.logit_multiplier}) that its forward did not apply; call unpatch(model)"
        )
    if vocab_size is not None and vocab_size != state.lm_head.out_features:
        raise ValueError(f"vocab_size {vocab_size} != lm_head.out_features {state.lm_head.out_features}")
    state.loss_called = True
    return state.loss


def _fused_loss(state: _PatchState, hidden: Tensor) -> Tensor:
    """transformers' ForCausalLMLoss on ``hidden @ lm_head.weight.T``, without the logits."""
    kw = state.loss_kwargs
    ignore_index = kw.get("ignore_index", -100)
    shift_labels = kw.get("shift_labels")
    if shift_labels is None:
        labels = F.pad(state.labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if shift_labels.shape != hidden.shape[:-1]:
        shift_labels = shift_labels.reshape(hidden.shape[:-1])
    num_items = kw.get("num_items_in_batch")
    hidden, head_weight, head_bias = head_operands(state.lm_head, hidden)  # a LoRA'd head: widened operands
    if state.logit_multiplier is not None:  # m (x W^T + b) = (m x) W^T + m b
        hidden = hidden * state.logit_multiplier
        head_bias = head_bias * state.logit_multiplier if head_bias is not None else None
    loss = fused_linear_cross_entropy(
        hidden, head_weight, shift_labels, linear_bias=head_bias, weight=None,
        ignore_index=ignore_index, reduction="sum" if num_items is not None else "mean", label_smoothing=0.0,
        z_loss=0.0, softcap=state.softcap, chunk_size=state.chunk_size, loss_dtype=torch.float32,
    )
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss


def _stock_head(state: _PatchState, hidden: Tensor) -> Tensor:
    """The head's own forward (an instance forward it had before the patch, else its class's)."""
    previous = state.saved.get("lm_head.forward")
    return previous(hidden) if previous is not None else type(state.lm_head).forward(state.lm_head, hidden)


def _real_logits(state: _PatchState, hidden: Optional[Tensor]) -> Optional[Tensor]:
    if hidden is None:
        return None
    logits = _stock_head(state, hidden)
    if state.logit_multiplier is not None:
        logits = logits * state.logit_multiplier
    if state.softcap is not None:
        logits = torch.tanh(logits / state.softcap) * state.softcap
    return logits


def _replace_logits(out, logits: Optional[Tensor]):
    """The model output with its ``logits`` replaced (``None``: removed, as stock does for None)."""
    if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...)
        items = list(out)
        if len(items) >= 2:
            if logits is None:
                del items[1]
            else:
                items[1] = logits
        return type(out)(items) if type(out) is tuple else out
    if hasattr(out, "keys") and "logits" in out.keys():
        # ModelOutput keeps a field set to None in its dict; rebuild it without the field instead
        fields = {k: v for k, v in out.items() if k != "logits"}
        if logits is not None:
            fields["logits"] = logits
        return type(out)(**fields)
    return out


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_causal_lm_loss` (a no-op on an unpatched model)."""
    target = unwrap(model)
    state = vars(target).get(_STATE_ATTR)
    if state is None:
        return model
    for owner, key in ((target, "model.forward"), (state.lm_head, "lm_head.forward")):
        vars(owner).pop("forward", None)
        if key in state.saved:
            vars(owner)["forward"] = state.saved[key]
        vars(owner).pop(_STATE_ATTR, None)
    vars(target).pop("_loss_function", None)
    return model
