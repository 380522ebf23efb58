"""Prefix tuning: ``apply(model, PrefixTuningConfig(...))`` -> handle; ``load`` (PEFT's format both ways)."""
from .config import PrefixTuningConfig
from .model import ENCODER_CHILD, PrefixEncoder, PrefixGeometry, PrefixHandle, apply, geometry, load

__all__ = ["ENCODER_CHILD", "PrefixEncoder", "PrefixGeometry", "PrefixHandle", "PrefixTuningConfig", "apply",
           "geometry", "load"]
