"""fastft.nn.LinearCrossEntropyLoss: drop-in for torch.nn.LinearCrossEntropyLoss (torch >= 2.13).

It owns the linear layer (``self.linear``, so ``linear.weight`` / ``linear.bias`` state-dict keys
match torch's module) and computes ``cross_entropy(linear(input), target)`` through
:func:`fastft.ops.linear_cross_entropy`, which never holds the logits.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.checks import check_reduction
from ..ops.defs.linear_cross_entropy import linear_cross_entropy


class LinearCrossEntropyLoss(nn.Module):
    """Same arguments as ``torch.nn.LinearCrossEntropyLoss``, plus ``z_loss``, ``softcap`` and
    ``chunk_size`` (token rows per chunk; default from the memory budget).

    ``weight`` (per-class) is a buffer, as in torch. ``ignore_index=None`` means -100, as in torch.
    ``options`` (torch's chunking options) is accepted so that swapping modules is one line; fastft
    always chunks, by its own budget, so it is not used. K-dimensional ``out_features`` are not
    supported (ValueError).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if tuple(out_features) != ():
            raise ValueError(f"out_features {tuple(out_features)}: K-dimensional losses are not supported, use ()")
        check_reduction(reduction)
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},) (one per class), got {tuple(weight.shape)}")
        if not (0.0 <= float(label_smoothing) <= 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = ()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
            f"bias={self.linear.bias is not None}", f"reduction={self.reduction}",
            f"ignore_index={self.ignore_index}", f"label_smoothing={self.label_smoothing}",
        ]
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)
