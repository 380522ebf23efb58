"""Bottleneck adapters: ``apply(model, BottleneckConfig(...))`` -> handle; ``load``; ``find_sites``."""
from .config import PLACEMENTS, BottleneckConfig
from .model import ADAPTER_CHILD, FORMAT, BottleneckHandle, apply, find_sites, load

__all__ = ["ADAPTER_CHILD", "FORMAT", "PLACEMENTS", "BottleneckConfig", "BottleneckHandle", "apply", "find_sites",
           "load"]
