"""Public functionals, one per op. Each validates its input, picks a backend and calls the
registered ``torch.ops.fastft.*`` op (so torch.compile sees one opaque op with fake and autograd)."""
from .cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
