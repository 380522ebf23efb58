"""Thin nn.Modules over fastft.ops, argument-for-argument drop-ins for the torch / PEFT modules."""
from .adapter import Adapter
from .cross_entropy import CrossEntropyLoss
from .kl import KLPenalty
from .linear_cross_entropy import LinearCrossEntropyLoss
from .lora import LoRALinear
from .rms_norm import RMSNorm
from .swiglu import SwiGLU

__all__ = ["Adapter", "CrossEntropyLoss", "KLPenalty", "LinearCrossEntropyLoss", "LoRALinear", "RMSNorm", "SwiGLU"]
