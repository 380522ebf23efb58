"""Pure-torch references of every fastft op: the oracle in tests and the fallback backend."""
from .cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
