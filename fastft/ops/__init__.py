"""Public functionals, one per op (one module each). Each validates its input, picks this op's backend
and calls its op defined through fastft.ops._define (the registered ``torch.ops.fastft.*`` op under
torch.compile, its eager twin otherwise). ``fastft.ops.registry`` lists them all."""
from . import registry
from .adapter import adapter
from .cross_entropy import cross_entropy
from .full_kl import full_kl
from .kl_penalty import kl_penalty
from .linear_cross_entropy import linear_cross_entropy
from .linear_full_kl import linear_full_kl
from .lora import lora_linear
from .rms_norm import rms_norm
from .selective_log_softmax import selective_log_softmax
from .swiglu import swiglu

__all__ = [
    "adapter",
    "cross_entropy",
    "full_kl",
    "kl_penalty",
    "linear_cross_entropy",
    "linear_full_kl",
    "lora_linear",
    "registry",
    "rms_norm",
    "selective_log_softmax",
    "swiglu",
]
