"""Prefix tuning's configuration: PEFT's ``PrefixTuningConfig`` fields and names (the subset fastft implements)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PrefixTuningConfig:
    """``num_virtual_tokens`` key/value vectors per layer; ``prefix_projection``: a two-layer tanh MLP of
    width ``encoder_hidden_size`` (None: the key/value width) produces them."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {n!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h <= 0):
            raise ValueError(f"encoder_hidden_size must be a positive int or None, got {h!r}")
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"task_type: fastft's prefix tuning is for decoders (CAUSAL_LM), got {self.task_type!r}")

    def to_peft_dict(self, geometry, encoder_hidden_size: int, base_model_name_or_path: Optional[str]) -> dict:
        """adapter_config.json content (PEFT's ``PrefixTuningConfig.to_dict()``) for a model of ``geometry``."""
        d = {
            "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
            "encoder_hidden_size": encoder_hidden_size, "inference_mode": True, "init_weights": None,
            "modules_to_save": None, "num_attention_heads": geometry.num_heads, "num_layers": geometry.num_layers,
            "num_transformer_submodules": 1, "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PREFIX_TUNING", "prefix_projection": self.prefix_projection, "revision": None,
            "task_type": self.task_type, "token_dim": geometry.token_dim,
        }
        version = _peft_version()
        if version:
            d["peft_version"] = version
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PrefixTuningConfig":
        """From an adapter_config.json dict; rejects what fastft cannot honour."""
        if d.get("peft_type") != "PREFIX_TUNING":
            raise ValueError(f"not a prefix-tuning adapter: peft_type={d.get('peft_type')!r}")
        if d.get("num_transformer_submodules", 1) != 1:
            raise ValueError("only decoder-only prefixes (num_transformer_submodules=1) are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["task_type"] = str(getattr(kwargs.get("task_type"), "value", kwargs.get("task_type") or "CAUSAL_LM"))
        return cls(**kwargs)


def _peft_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return None
