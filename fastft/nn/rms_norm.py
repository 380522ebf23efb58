"""fastft.nn.RMSNorm: a drop-in for Hugging Face's LlamaRMSNorm (and, with options, GemmaRMSNorm) over
fastft.ops.rms_norm."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.defs.rms_norm import CASTING_MODES, rms_norm


class RMSNorm(nn.Module):
    """``weight * rsqrt(mean(x^2) + eps) * x`` over the last dimension, forward and backward fused.

    Same constructor, parameter (``weight``, so the same state-dict key) and ``variance_epsilon`` attribute as
    transformers' ``LlamaRMSNorm(hidden_size, eps)``, and the same values to the rounding. ``offset`` and
    ``casting_mode`` cover the other Hugging Face norms: ``RMSNorm(dim, eps, offset=1.0, casting_mode="gemma")``
    is ``GemmaRMSNorm``. The weight starts so that the scale ``offset + weight`` is 1 (ones for Llama, zeros for
    Gemma, as those modules start).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, offset: float = 0.0, casting_mode: str = "llama",
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if casting_mode not in CASTING_MODES:
            raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - float(offset), device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.offset = float(offset)
        self.casting_mode = casting_mode

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=self.offset,
                        casting_mode=self.casting_mode)

    def extra_repr(self) -> str:
        extra = "" if self.casting_mode == "llama" and self.offset == 0.0 else \
            f", offset={self.offset}, casting_mode={self.casting_mode!r}"
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{extra}"
