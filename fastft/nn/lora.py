"""fastft.nn.LoRALinear: an nn.Linear with a LoRA adapter, computed by the fused fastft.ops.lora_linear.

Drop-in for PEFT's ``lora.Linear`` (single adapter): same scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA), same init (A kaiming-uniform with a = sqrt(5), B zeros), same dropout placement (on the LoRA
branch's input). It behaves as the Linear it wraps (``weight``, ``bias``, ``in_features``,
``out_features``) and keeps that Linear as ``base_layer``, as PEFT does, so the full state dict keys
match PEFT's for the base weights; the adapter parameters are ``lora_A`` [r, in] and ``lora_B`` [out, r]
(PEFT's ``lora_A.<adapter>.weight`` / ``lora_B.<adapter>.weight``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.defs.lora import lora_linear
from ..reference.lora import delta_weight


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA (Kalajdzievski 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def check_lora_hyperparameters(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
    if not math.isfinite(float(lora_alpha)):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if not (0.0 <= float(lora_dropout) < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


class LoRALinear(nn.Module):
    """``base(x) + scaling * dropout(x) A^T B^T`` for an existing ``nn.Linear`` ``base`` (kept, not copied).

    ``adapter_dtype``: dtype of ``lora_A`` / ``lora_B``. Default: float32 when the base weight is
    fp16/bf16 (PEFT's ``autocast_adapter_dtype=True``), else the base weight's dtype.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        init_lora_weights: bool = True,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_lora_hyperparameters(r, lora_alpha, lora_dropout)
        self.base_layer = base
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.merged = False
        self.disable_adapters = False
        w = base.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=adapter_dtype))
        if init_lora_weights:
            self.reset_lora_parameters()

    @classmethod
    def from_parameters(cls, base: nn.Linear, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float,
                        lora_dropout: float = 0.0, *, lora_alpha: Optional[float] = None,
                        use_rslora: bool = False) -> "LoRALinear":
        """Wrap ``base`` around EXISTING adapter parameters (shared, not copied), e.g. a PEFT layer's."""
        r = lora_A.shape[0]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        check_lora_hyperparameters(r, lora_alpha if lora_alpha is not None else scaling * r, lora_dropout)
        layer.base_layer = base
        layer.r = r
        layer.lora_alpha = lora_alpha if lora_alpha is not None else scaling * r
        layer.lora_dropout = float(lora_dropout)
        layer.use_rslora = bool(use_rslora)
        layer.scaling = float(scaling)
        layer.merged = False
        layer.disable_adapters = False
        layer.lora_A = lora_A
        layer.lora_B = lora_B
        return layer

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # The Linear it stands for.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def get_delta_weight(self) -> Tensor:
        """scaling * B A, in the base weight's dtype: what ``merge()`` adds to the weight."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (forward is then the plain Linear). No-op if merged."""
        if not self.merged:
            self.weight.add_(self.get_delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to the rounding of the weight's dtype). No-op if not merged."""
        if self.merged:
            self.weight.sub_(self.get_delta_weight())
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disable_adapters:
            return self.base_layer(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            # Follow autocast as F.linear would: compute in the autocast dtype.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(x.device.type, enabled=False):
                return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling,
                                   dropout_p=self.lora_dropout, training=self.training)
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"r={self.r}",
                 f"lora_alpha={self.lora_alpha}", f"scaling={self.scaling:g}"]
        if self.lora_dropout:
            parts.append(f"lora_dropout={self.lora_dropout}")
        if self.merged:
            parts.append("merged=True")
        return ", ".join(parts)
