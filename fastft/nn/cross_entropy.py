"""fastft.nn.CrossEntropyLoss: drop-in for torch.nn.CrossEntropyLoss (class dimension last)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.checks import check_reduction
from ..ops.defs.cross_entropy import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Same arguments as ``torch.nn.CrossEntropyLoss`` (plus ``z_loss``, ``softcap`` and
    ``inplace_backward``, which writes the gradient over the input logits: see
    :func:`fastft.ops.cross_entropy` for that contract).

    ``weight`` is a buffer, as in torch. ``size_average``/``reduce`` (deprecated in torch) are not
    accepted. See :func:`fastft.ops.cross_entropy` for the semantics.
    """

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        return ", ".join(parts)


