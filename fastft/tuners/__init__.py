"""fastft.tuners: the parameter-efficient methods (LoRA, bottleneck adapters, prefix tuning) on one base.

    from fastft import tuners

    handle = tuners.apply(model, tuners.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    tuners.apply(model, tuners.PrefixTuningConfig(num_virtual_tokens=10))   # methods compose
    print(handle.report)
    handle.save("out/lora")                  # LoRA and prefix: PEFT's format; bottleneck: fastft's own
    handle.remove()                          # the model as before (handle.merge() folds LoRA in instead)
    tuners.load(fresh_model, "out/lora")     # any method's folder; frozen unless trainable=True

Every method is a package (``lora``, ``bottleneck``, ``prefix``) with a config dataclass (PEFT's field
names where PEFT has the method), ``apply(model, config, fused=True) -> handle`` and
``load(model, directory, trainable=False, fused=True)``. ``fused=False`` is the stock implementation
(PEFT's LoRA layers, PEFT's prefix tuning, the bottleneck block in eager torch). The shared pieces
(freezing, registering, saving, the report) are in :mod:`fastft.tuners.base`.

``load``'s ``trainable`` defaults to False for every method, as PEFT's ``is_trainable``: loading is
most often for inference or as a frozen reference; resuming training says so.
"""
from __future__ import annotations

import os

from torch import nn

from . import bottleneck, lora, prefix
from .base import (BOTTLENECK_CONFIG_NAME, BOTTLENECK_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME,
                   TunerHandle, TunerReport, count_parameters, gather_full, get_handle, handles, read_json, unwrap)
from .bottleneck import BottleneckConfig, BottleneckHandle, find_sites
from .lora import LoraConfig, LoraHandle, find_targets, from_peft, layer_from_peft, lora_layers, merge_and_unload
from .prefix import PrefixEncoder, PrefixHandle, PrefixTuningConfig

METHODS = {LoraConfig: lora, BottleneckConfig: bottleneck, PrefixTuningConfig: prefix}


def apply(model: nn.Module, config, *, fused: bool = True) -> TunerHandle:
    """The method ``config`` names (LoraConfig, PrefixTuningConfig, BottleneckConfig; a peft.LoraConfig
    too) applied to ``model``; returns its handle."""
    method = METHODS.get(type(config))
    if method is None and str(getattr(getattr(config, "peft_type", None), "value", "")) == "LORA":
        method = lora  # peft.LoraConfig
    if method is None:
        raise TypeError(f"config must be one of {', '.join(c.__name__ for c in METHODS)} (or a peft.LoraConfig), "
                        f"got {type(config).__name__}")
    return method.apply(model, config, fused=fused)


def load(model: nn.Module, directory: str, *, trainable: bool = False, fused: bool = True) -> TunerHandle:
    """The method saved in ``directory`` (its config file says which) applied to ``model`` with the saved
    weights. Frozen unless ``trainable`` (the same default for every method, as PEFT's ``is_trainable``)."""
    method = _saved_method(directory)
    return method.load(model, directory, trainable=trainable, fused=fused)


def _saved_method(directory: str):
    if os.path.exists(os.path.join(directory, BOTTLENECK_CONFIG_NAME)):
        return bottleneck
    path = os.path.join(directory, PEFT_CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {PEFT_CONFIG_NAME} or {BOTTLENECK_CONFIG_NAME} in {directory}")
    saved = read_json(path)
    if saved.get("format") == bottleneck.FORMAT:  # written before bottleneck adapters had their own file name
        return bottleneck
    kind = str(saved.get("peft_type", "")).upper()
    if kind == "LORA":
        return lora
    if kind == "PREFIX_TUNING":
        return prefix
    raise ValueError(f"{path}: peft_type {saved.get('peft_type')!r} is not a method fastft has (LORA, PREFIX_TUNING)")


__all__ = [
    "BOTTLENECK_CONFIG_NAME", "BOTTLENECK_WEIGHTS_NAME", "BottleneckConfig", "BottleneckHandle", "LoraConfig",
    "LoraHandle", "METHODS", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PrefixEncoder", "PrefixHandle",
    "PrefixTuningConfig", "TunerHandle", "TunerReport", "apply", "bottleneck", "count_parameters", "find_sites",
    "find_targets", "from_peft", "gather_full", "get_handle", "handles", "layer_from_peft", "load", "lora",
    "lora_layers", "merge_and_unload", "prefix", "unwrap",
]
