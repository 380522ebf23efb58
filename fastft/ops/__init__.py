"""Public functionals, one per op. Each validates its input, picks a backend and calls the
registered ``torch.ops.fastft.*`` op (so torch.compile sees one opaque op with fake and autograd)."""
from .adapter import adapter
from .cross_entropy import cross_entropy
from .kl import full_kl, kl_penalty, linear_full_kl, selective_log_softmax
from .linear_cross_entropy import linear_cross_entropy
from .lora import lora_linear

__all__ = [
    "adapter",
    "cross_entropy",
    "full_kl",
    "kl_penalty",
    "linear_cross_entropy",
    "linear_full_kl",
    "lora_linear",
    "selective_log_softmax",
]
