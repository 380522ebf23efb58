"""LoRA's configuration: PEFT's ``LoraConfig`` fields, names and defaults (the subset fastft implements)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from ...nn.lora import check_lora_hyperparameters, lora_scaling

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """PEFT's LoRA fields, names and defaults (the subset fastft implements)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list] = None
    init_lora_weights: bool = True
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False
    peft_type: str = field(default="LORA", init=False)

    def __post_init__(self) -> None:
        check_lora_hyperparameters(self.r, self.lora_alpha, self.lora_dropout)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False):
            raise ValueError(f"init_lora_weights: only True (PEFT's default) or False is supported, got "
                             f"{self.init_lora_weights!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (list, str)):
                raise ValueError(f"{name} must be a list of names, a regex string or None, got {type(value).__name__}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def to_peft_dict(self) -> dict:
        """adapter_config.json content, with the fields PEFT writes at their defaults."""
        d = {
            "peft_type": "LORA", "task_type": self.task_type, "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules, "exclude_modules": self.exclude_modules, "bias": self.bias,
            "use_rslora": self.use_rslora, "modules_to_save": self.modules_to_save,
            "init_lora_weights": self.init_lora_weights, "inference_mode": True, "fan_in_fan_out": False,
            "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
            "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {}, "revision": None,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        """From an adapter_config.json dict (or a PEFT config's fields); rejects what fastft cannot honour."""
        if str(d.get("peft_type", "LORA")).upper().split(".")[-1] != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type={d.get('peft_type')!r}")
        unsupported = {
            "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "layers_to_transform": None,
            "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
            "use_qalora": False, "alora_invocation_tokens": None,
        }
        for key, default in unsupported.items():
            if key in d and d[key] not in (default, [], {}):
                raise ValueError(f"LoRA option {key}={d[key]!r} is not supported by fastft")
        for key in ("rank_pattern", "alpha_pattern"):
            if d.get(key):
                raise ValueError(f"LoRA option {key} (per-module ranks/alphas) is not supported by fastft")
        init = d.get("init_lora_weights", True)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["init_lora_weights"] = init is True
        if kwargs.get("task_type") is not None:
            kwargs["task_type"] = str(getattr(kwargs["task_type"], "value", kwargs["task_type"]))
        kwargs["inference_mode"] = bool(kwargs.get("inference_mode", False))
        return cls(**kwargs)


def as_lora_config(config) -> LoraConfig:
    """fastft's LoraConfig as is; a peft.LoraConfig (or any object with its fields) converted."""
    if isinstance(config, LoraConfig):
        return config
    if isinstance(config, dict):
        return LoraConfig.from_dict(config)
    if hasattr(config, "to_dict") and hasattr(config, "r"):
        d = config.to_dict()
        d["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
        for key in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(d.get(key), set):
                d[key] = sorted(d[key])
        return LoraConfig.from_dict(d)
    raise TypeError(f"config must be a fastft.tuners.LoraConfig or a peft.LoraConfig, got {type(config).__name__}")
