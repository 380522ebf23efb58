"""The output layer of a causal LM as the operands of one fused linear cross-entropy.

A plain ``nn.Linear`` head is ``(hidden, W, b)``. A LoRA'd head (fastft's ``LoRALinear`` or PEFT's
``lora.Linear`` with one active adapter) computes

    logits = h W^T + b + s * drop(h) A^T B^T  =  [h, u] [W, B]^T + b,   u = s * drop(h) A^T  ([tokens, r])

so it is the same fused op on the hidden states widened by the r LoRA coordinates and the weight
widened by B. Autograd through the two concatenations gives dB (from the widened weight's gradient)
and dA, dh (through u). The concatenated weight is a copy of W (vocab x hidden) per step; a
``low_rank=(u, B)`` option of ``fastft.ops.linear_cross_entropy`` (add u_c B^T to each chunk's logits,
accumulate dB += dlogits_c^T u_c and du_c = dlogits_c B) would remove that copy. A tied head
(``lm_head.weight is embed_tokens.weight``) needs nothing special: the gradient of W reaches the
shared parameter through the concatenation like any other.

The dropout on the LoRA branch is ``torch.nn.functional.dropout`` drawn where PEFT draws it (inside the
head's call, same shape), so with the same RNG state the mask is PEFT's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fsdp import unsharded_class


@dataclass
class _LoRABranch:
    lora_A: Tensor  # [r, in]
    lora_B: Tensor  # [out, r]
    scaling: float
    dropout_p: float


def _is_plain_linear(head: nn.Module) -> bool:
    """An ``nn.Linear`` itself, also when FSDP2's ``fully_shard`` has put its subclass ``FSDPLinear`` on it
    (a subclass of anything else, e.g. a quantized linear, is not plain)."""
    return unsharded_class(head) is nn.Linear


def _base_linear(head: nn.Module) -> Optional[nn.Module]:
    from ..nn.lora import LoRALinear

    if isinstance(head, LoRALinear):
        return head.base_layer
    get_base = getattr(head, "get_base_layer", None)
    return get_base() if callable(get_base) and _is_peft_lora(head) else None


def _is_peft_lora(head: nn.Module) -> bool:
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear
    except ImportError:
        return False
    return isinstance(head, PeftLoraLinear)


def unsupported_reason(head: nn.Module) -> Optional[str]:
    """Why ``head`` cannot be fused (None: it can). Checked at patch time; :func:`lora_branch` re-checks
    the per-call state (merged, disabled) at every forward."""
    if _is_plain_linear(head):
        return None
    base = _base_linear(head)
    if base is None:
        return (f"the output layer is a {type(head).__name__}; fastft fuses a plain torch.nn.Linear head or one "
                "with a single LoRA adapter (fastft LoRALinear or PEFT lora.Linear)")
    if type(base) is not nn.Linear:
        return f"the LoRA'd output layer wraps a {type(base).__name__}, not a plain torch.nn.Linear"
    if _is_peft_lora(head):
        adapters = list(head.lora_A.keys())
        if len(adapters) != 1:
            return f"the PEFT LoRA output layer holds {len(adapters)} adapters ({adapters}); fastft fuses one"
        adapter = adapters[0]
        if head.lora_variant.get(adapter) is not None or head.use_dora.get(adapter, False):
            return "the PEFT LoRA output layer is a LoRA variant (DoRA, ...); fastft fuses plain LoRA"
        if head.lora_A[adapter].bias is not None or head.lora_B[adapter].bias is not None:
            return "the PEFT LoRA output layer has lora_bias=True"
        if not isinstance(head.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
            return f"the PEFT LoRA output layer's dropout is a {type(head.lora_dropout[adapter]).__name__}"
    return None


def lora_branch(head: nn.Module) -> Optional[_LoRABranch]:
    """The LoRA branch that ``head`` adds right now (None for a plain, merged or disabled head)."""
    if _is_plain_linear(head) or head.merged or head.disable_adapters:
        return None
    if not _is_peft_lora(head):  # fastft LoRALinear
        return _LoRABranch(head.lora_A, head.lora_B, float(head.scaling), float(head.lora_dropout))
    (adapter,) = head.lora_A.keys()
    if adapter not in head.active_adapters:
        return None
    dropout = head.lora_dropout[adapter]
    return _LoRABranch(head.lora_A[adapter].weight, head.lora_B[adapter].weight, float(head.scaling[adapter]),
                       float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0)


def head_operands(head: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(input, weight, bias)`` with ``F.linear(input, weight, bias)`` equal to ``head(hidden)``."""
    base = head if _is_plain_linear(head) else _base_linear(head)
    branch = lora_branch(head)
    if branch is None:
        return hidden, base.weight, base.bias
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    dropped = F.dropout(hidden, branch.dropout_p, head.training) if branch.dropout_p > 0 else hidden
    coords = F.linear(dropped.to(branch.lora_A.dtype), branch.lora_A) * branch.scaling
    widened_input = torch.cat([hidden.to(dtype), coords.to(dtype)], dim=-1)
    widened_weight = torch.cat([base.weight.to(dtype), branch.lora_B.to(dtype)], dim=1)
    bias = base.bias.to(dtype) if base.bias is not None else None
    return widened_input, widened_weight, bias


def logit_transforms(model: nn.Module) -> tuple[Optional[float], Optional[float]]:
    """(softcap, multiplier) that the model's forward applies to the logits before its loss, read from the
    config's attributes: Gemma-2/3 ``final_logit_softcapping`` (tanh cap), Cohere ``logit_scale`` (times) and
    Granite ``logits_scaling`` (divided by). Whether the forward really transformed the logits is checked
    at every fused forward of causal_lm_loss; fastft.patch also checks the loss of unknown model types."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        config = get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    scaling = getattr(config, "logits_scaling", None)
    if scale is not None and scaling is not None:
        raise ValueError(f"{type(model).__name__}'s config has both logit_scale and logits_scaling; fastft does not "
                         "know which one its forward applies")
    multiplier = float(scale) if scale is not None else (1.0 / float(scaling) if scaling is not None else None)
    return (float(softcap) if softcap is not None else None), multiplier
