"""fastft.nn.Adapter: a bottleneck adapter block (Houlsby et al. 2019) over fastft.ops.adapter."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ops.defs.adapter import ACTIVATIONS, adapter
from ..reference.adapter import activation_fn


class Adapter(nn.Module):
    """``x + scale * up(dropout(act(down(x))))`` with ``down = Linear(hidden_size, adapter_size)`` and
    ``up = Linear(adapter_size, hidden_size)``, fused (one registered op, forward and backward).

    Both projections start as small normals (std ``init_std``, 0.01 by default) with zero biases, so a
    new adapter is close to the identity and does not disturb the model it is inserted into. The
    parameters may be kept in a wider dtype than the activations (fp32 masters in a bf16 model, as PEFT
    does): they are cast to ``x``'s dtype for the op and gradients flow back to them.

    ``fused=False`` runs the same block as plain torch modules would (two ``F.linear``, the activation,
    ``F.dropout`` with torch's RNG): the eager baseline of comparisons such as the runtime's
    ``kernels.bottleneck = false``. Chosen at construction (``self.fused``), like any other option.
    """

    def __init__(
        self,
        hidden_size: int,
        adapter_size: int = 64,
        activation: str = "relu",
        dropout: float = 0.1,
        *,
        scale: float = 1.0,
        bias: bool = True,
        init_std: float = 0.01,
        fused: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(adapter_size, bool) or not isinstance(adapter_size, int) or adapter_size <= 0:
            raise ValueError(f"adapter_size must be a positive int, got {adapter_size!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_size = hidden_size
        self.adapter_size = adapter_size
        self.activation = activation
        self.dropout = float(dropout)
        self.scale = float(scale)
        self.init_std = float(init_std)
        self.fused = bool(fused)
        self.down = nn.Linear(hidden_size, adapter_size, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(adapter_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=self.init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size mismatch: Adapter({self.hidden_size}) got input of shape {tuple(x.shape)}")

        def cast(t):
            return None if t is None else t.to(x.dtype)

        if not self.fused:
            h = activation_fn(self.activation, F.linear(x, cast(self.down.weight), cast(self.down.bias)))
            h = F.dropout(h, self.dropout, self.training)
            return x + self.scale * F.linear(h, cast(self.up.weight), cast(self.up.bias))
        return adapter(
            x, cast(self.down.weight), cast(self.down.bias), cast(self.up.weight), cast(self.up.bias),
            activation=self.activation, dropout_p=self.dropout, training=self.training, scale=self.scale,
        )

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, adapter_size={self.adapter_size}, activation={self.activation!r}, "
                f"dropout={self.dropout}, scale={self.scale}" + ("" if self.fused else ", fused=False"))
