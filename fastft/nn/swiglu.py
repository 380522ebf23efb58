"""fastft.nn.SwiGLU: a drop-in for Hugging Face's LlamaMLP whose gated product is fastft.ops.swiglu."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.defs.swiglu import swiglu

_SILU_NAMES = ("silu", "swish")


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the gated product fused (forward and backward).

    Built from a transformers config like ``LlamaMLP(config)`` (``hidden_size``, ``intermediate_size``,
    ``mlp_bias``, ``hidden_act`` which must be silu), with the same submodules ``gate_proj`` / ``up_proj`` /
    ``down_proj`` (nn.Linear), so a LlamaMLP state dict loads as is and PEFT targets the same names.
    ``intermediate_size`` overrides the config's (models whose MLP width differs per layer).
    """

    def __init__(self, config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in _SILU_NAMES:
            raise ValueError(f"SwiGLU needs hidden_act in {_SILU_NAMES}, got config.hidden_act={act!r}")
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
