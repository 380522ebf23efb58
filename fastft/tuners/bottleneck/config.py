"""Bottleneck adapters' configuration (PEFT has no such method: the names are fastft's)."""
from __future__ import annotations

from dataclasses import dataclass

from ...ops.defs.adapter import ACTIVATIONS

PLACEMENTS = ("houlsby", "pfeiffer")


@dataclass(frozen=True)
class BottleneckConfig:
    """``adapter_size``: the bottleneck width; ``placement``: "houlsby" (after attention and feed-forward)
    or "pfeiffer" (after feed-forward only); ``activation``: one of fastft.ops.adapter.ACTIVATIONS;
    ``dropout``: on the bottleneck activations; ``scale``: of the adapter's output before the residual add."""

    adapter_size: int = 64
    placement: str = "houlsby"
    activation: str = "relu"
    dropout: float = 0.1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.adapter_size, bool) or not isinstance(self.adapter_size, int) or self.adapter_size <= 0:
            raise ValueError(f"adapter_size must be a positive int, got {self.adapter_size!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; expected one of {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
