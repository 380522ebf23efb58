"""Thin nn.Modules over fastft.ops, argument-for-argument drop-ins for the torch modules."""
from .cross_entropy import CrossEntropyLoss

__all__ = ["CrossEntropyLoss"]
