"""fastft.lora: LoRA on a whole model, interchangeable with PEFT.

    model = apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ... train ...
    save_adapter(model, "out/")            # PEFT's format: PeftModel.from_pretrained(base, "out/") loads it
    load_adapter(model, "peft_adapter/")   # an adapter PEFT saved
    from_peft(peft_model)                  # swap PEFT's LoRA layers for fastft's fused ones, in place
    merge_and_unload(model)                # plain nn.Linear layers with the adapter folded in

``apply_lora`` also takes a ``peft.LoraConfig``. Targets follow PEFT's rules: a list entry matches a
module whose qualified name equals it or ends with "." + it; a string is a regex matched against the
whole qualified name; "all-linear" is every nn.Linear but the output layer. Differences from PEFT, on
purpose: a list entry that matches nothing is an error (a typo would otherwise silently train less),
and ``modules_to_save`` modules are trained in place (PEFT trains a copy so the adapter can be
disabled); their saved keys are PEFT's all the same.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .nn.lora import LoRALinear, check_lora_hyperparameters

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_NAME_BIN = "adapter_model.bin"
ALL_LINEAR = "all-linear"
_PEFT_PREFIX = "base_model.model."
_BIAS_MODES = ("none", "all", "lora_only")

# PEFT's default targets when target_modules is None (peft.utils.constants, LoRA), for common models.
_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
}


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
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}")
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
        from .nn.lora import lora_scaling

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
    raise TypeError(f"config must be a fastft.lora.LoraConfig or a peft.LoraConfig, got {type(config).__name__}")


# ------------------------------------------------------------------------------------------------
# Targeting
# ------------------------------------------------------------------------------------------------


def _root(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel, else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _matches(name: str, pattern) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def _output_layer_names(model: nn.Module) -> set:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in ("lm_head", "embed_out", "output_layer"):
            names.add(name)
    return names


def _default_targets(model: nn.Module) -> list:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _DEFAULT_TARGETS:
        raise ValueError(f"target_modules is None and fastft knows no default targets for model_type {model_type!r}; "
                         "pass target_modules (a list of names, a regex, or 'all-linear')")
    return _DEFAULT_TARGETS[model_type]


def find_targets(model: nn.Module, config: LoraConfig) -> list:
    """Qualified names of the modules ``config`` targets in ``model``; ValueError on a bad target."""
    targets = config.target_modules if config.target_modules is not None else _default_targets(model)
    named = [(n, m) for n, m in model.named_modules() if n]
    if targets == ALL_LINEAR:
        skip = _output_layer_names(model)
        chosen = [n for n, m in named if isinstance(m, (nn.Linear, LoRALinear)) and n not in skip]
        chosen = [n for n in chosen if not any(n.startswith(c + ".") for c in chosen)]  # not a LoRALinear's base
    else:
        chosen = [n for n, _ in named if _matches(n, targets)]
        if isinstance(targets, list):
            for t in targets:
                if not any(n == t or n.endswith("." + t) for n in chosen):
                    raise ValueError(f"target module {t!r} matches no module of {type(model).__name__}")
    if config.exclude_modules:
        chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
    if not chosen:
        raise ValueError(f"target_modules={targets!r} (exclude_modules={config.exclude_modules!r}) matches no "
                         f"module of {type(model).__name__}")
    modules = dict(named)
    for n in chosen:
        if not isinstance(modules[n], (nn.Linear, LoRALinear)):
            raise ValueError(f"target {n!r} is a {type(modules[n]).__name__}, not an nn.Linear; fastft's LoRA "
                             "wraps Linear layers only")
    return chosen


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict:
    """{qualified name: LoRALinear} under ``model`` (names relative to the transformers model)."""
    return {n: m for n, m in _root(model).named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _mark_trainable(root: nn.Module, config: LoraConfig) -> None:
    for p in root.parameters():
        p.requires_grad_(False)
    for name, module in root.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if config.bias == "lora_only" and module.bias is not None:
                module.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in root.named_parameters():
            if name.split(".")[-1] == "bias":
                p.requires_grad_(True)
    for name in _modules_to_save(root, config):
        for p in root.get_submodule(name).parameters():
            p.requires_grad_(True)


def _modules_to_save(root: nn.Module, config: LoraConfig) -> list:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in root.named_modules() if n and _matches(n, list(config.modules_to_save))]
    for t in config.modules_to_save:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"modules_to_save entry {t!r} matches no module")
    return names


def apply_lora(model: nn.Module, config, *, verbose: bool = False) -> nn.Module:
    """Wrap every targeted nn.Linear of ``model`` in a LoRALinear (in place), freeze everything but the
    adapters (and the biases / modules_to_save the config names), and return ``model``. ``config``:
    fastft's or PEFT's LoraConfig. Trainable / total parameter counts are logged (printed if
    ``verbose``) and returned by :func:`count_parameters`."""
    config = as_lora_config(config)
    root = _root(model)
    if lora_layers(root):
        raise ValueError("model already has fastft LoRA layers; merge_and_unload() it first (one adapter per model)")
    for name in find_targets(root, config):
        base = root.get_submodule(name)
        layer = LoRALinear(base, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
                           init_lora_weights=False)
        if config.init_lora_weights:
            _init_like_peft(layer)
        _set_submodule(root, name, layer)
    _mark_trainable(root, config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    root._fastft_lora_config = config
    trainable, total = count_parameters(root)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    logger.info(line)
    if verbose:
        print(line)
    return model


def _init_like_peft(layer: LoRALinear) -> None:
    """PEFT's default init with PEFT's random draws, so that one seed gives PEFT's adapters.

    Per layer, PEFT (0.13 .. 0.21) builds ``lora_A = nn.Linear(in, r)`` and ``lora_B = nn.Linear(r, out)``
    (each constructor draws its kaiming-uniform weight on the CPU, default dtype), then re-draws A
    kaiming-uniform(a=sqrt(5)) and zeroes B, then moves them to the base layer's device and dtype. The
    same three draws, in that order, keep the generator in step across the layers of a model."""
    dtype = torch.get_default_dtype()
    with torch.no_grad():
        for shape in ((layer.r, layer.in_features), (layer.out_features, layer.r)):  # the two constructors
            nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=math.sqrt(5))
        lora_A = torch.empty(layer.r, layer.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        layer.lora_A.copy_(lora_A)
        layer.lora_B.zero_()


def get_lora_config(model: nn.Module) -> LoraConfig:
    root = _root(model)
    config = getattr(root, "_fastft_lora_config", None)
    if config is None:
        raise ValueError("model has no fastft LoRA adapter (use apply_lora, load_adapter or from_peft first)")
    return config


# ------------------------------------------------------------------------------------------------
# PEFT's file format
# ------------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter's tensors under PEFT's key names (``base_model.model.<path>.lora_A.weight``, ...)."""
    root = _root(model)
    config = get_lora_config(root)
    out = {}
    for name, layer in lora_layers(root).items():
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if config.bias == "lora_only" and layer.bias is not None:
            out[f"{_PEFT_PREFIX}{name}.base_layer.bias"] = layer.bias
    if config.bias == "all":
        for name, p in root.named_parameters():
            if name.split(".")[-1] == "bias":
                out[f"{_PEFT_PREFIX}{name}"] = p
    for name in _modules_to_save(root, config):
        for key, t in root.get_submodule(name).state_dict().items():
            out[f"{_PEFT_PREFIX}{name}.{key}"] = t
    return {k: v.detach() for k, v in out.items()}


def save_adapter(model: nn.Module, save_directory: str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format, so
    ``peft.PeftModel.from_pretrained(base_model, save_directory)`` loads it."""
    from safetensors.torch import save_file

    config = get_lora_config(model)
    os.makedirs(save_directory, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in adapter_state_dict(model).items()}  # no shared storage
    save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(config.to_peft_dict(), f, indent=2, sort_keys=True)


def _read_adapter_weights(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if os.path.exists(path):
        from safetensors.torch import load_file

        return load_file(path)
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME_BIN)
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} or {ADAPTER_WEIGHTS_NAME_BIN} in {directory}")


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a LoRA adapter saved by PEFT (or by :func:`save_adapter`) into ``model``: applies LoRA per
    the saved adapter_config.json when the model has none yet, then copies the saved tensors in.
    Every saved tensor must find its place (and every adapter parameter must be saved)."""
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory}")
    with open(config_path) as f:
        config = LoraConfig.from_dict(json.load(f))
    root = _root(model)
    if not lora_layers(root):
        apply_lora(root, config)
    else:
        have = get_lora_config(root)
        if (have.r, have.lora_alpha, have.use_rslora) != (config.r, config.lora_alpha, config.use_rslora):
            raise ValueError(f"the model's adapter (r={have.r}, alpha={have.lora_alpha}) differs from the saved one "
                             f"(r={config.r}, alpha={config.lora_alpha})")
    saved = _read_adapter_weights(directory)
    layers = lora_layers(root)
    params = dict(root.named_parameters())
    buffers = dict(root.named_buffers())
    expected = set()
    with torch.no_grad():
        for key, value in saved.items():
            if not key.startswith(_PEFT_PREFIX):
                raise ValueError(f"unexpected key {key!r} in the adapter (PEFT keys start with {_PEFT_PREFIX!r})")
            name = key[len(_PEFT_PREFIX):]
            m = re.fullmatch(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
            if m and m.group(1) in layers:
                target = getattr(layers[m.group(1)], f"lora_{m.group(2)}")
                expected.add(f"{m.group(1)}.lora_{m.group(2)}")
            elif name in params or name in buffers:
                target = params.get(name, buffers.get(name))
            else:
                raise ValueError(f"adapter key {key!r} matches nothing in {type(root).__name__}")
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(target.shape)}")
            target.copy_(value)
    missing = [f"{n}.lora_{ab}" for n in layers for ab in "AB" if f"{n}.lora_{ab}" not in expected]
    if missing:
        raise ValueError(f"the adapter in {directory} has no weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    root._fastft_lora_config = config
    return model


# ------------------------------------------------------------------------------------------------
# PEFT models, merging
# ------------------------------------------------------------------------------------------------


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swap every PEFT LoRA Linear (one adapter each) of ``peft_model`` for a fastft LoRALinear in place:
    the same base layer and the same lora_A / lora_B parameter objects (an optimizer built on them keeps
    working), the same scaling and dropout. Returns ``peft_model``. Save with :func:`save_adapter`
    afterwards (PEFT's own save_pretrained looks for its layer classes)."""
    from peft.tuners.lora import LoraLayer

    root = _root(peft_model)
    swapped = 0
    for name, module in list(root.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        adapters = list(module.lora_A.keys())
        if len(adapters) != 1:
            raise ValueError(f"{name}: from_peft takes one adapter per layer, found {adapters}")
        adapter = adapters[0]
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear) or not isinstance(module.lora_A[adapter], nn.Linear):
            raise ValueError(f"{name}: only LoRA on nn.Linear is supported, got base {type(base).__name__}")
        if module.use_dora.get(adapter, False) or getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{name}: DoRA and fan_in_fan_out layers are not supported by fastft")
        if module.merged:
            raise ValueError(f"{name}: the PEFT layer is merged; unmerge it first")
        if module.lora_A[adapter].bias is not None or module.lora_B[adapter].bias is not None:
            raise ValueError(f"{name}: LoRA with lora_bias=True is not supported by fastft")
        dropout = module.lora_dropout[adapter]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
        layer = LoRALinear.from_parameters(
            base, module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter]), p,
            lora_alpha=module.lora_alpha[adapter], use_rslora=bool(module.use_rslora.get(adapter, False)),
        )
        layer.train(module.training)
        _set_submodule(root, name, layer)
        swapped += 1
    if swapped == 0:
        raise ValueError(f"no PEFT LoRA layer found in {type(peft_model).__name__}")
    peft_config = getattr(peft_model, "peft_config", None)
    if isinstance(peft_config, dict) and len(peft_config) == 1:
        root._fastft_lora_config = as_lora_config(next(iter(peft_config.values())))
    return peft_model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and put the plain nn.Linear back; returns the
    unwrapped model (the transformers model for a PeftModel, as PEFT's merge_and_unload does).

    Both kinds of LoRA layer are merged: fastft's LoRALinear and PEFT's own LoRA layers (a PeftModel
    straight from ``get_peft_model``, or one partly swapped by :func:`from_peft`). A PeftModel is
    finished by PEFT's own ``merge_and_unload`` (it also unwraps ``modules_to_save`` copies). A plain
    model holding PEFT layers of another kind than LoRA raises ValueError rather than keep them."""
    root = _root(model)
    for name, layer in lora_layers(root).items():
        layer.merge()
        _set_submodule(root, name, layer.base_layer)
    if hasattr(root, "_fastft_lora_config"):
        del root._fastft_lora_config
    peft_layers = _peft_tuner_layers(root)
    if not peft_layers:
        return root
    if callable(getattr(model, "merge_and_unload", None)) and hasattr(model, "peft_config"):
        return model.merge_and_unload()  # PeftModel: PEFT merges its own layers
    from peft.tuners.lora import LoraLayer

    for name, module in peft_layers.items():
        if not isinstance(module, LoraLayer):
            raise ValueError(f"{name}: a PEFT {type(module).__name__} is not a LoRA layer; merge it with PEFT "
                             "(pass the PeftModel itself)")
        module.merge()
        _set_submodule(root, name, module.get_base_layer())
    return root


def _peft_tuner_layers(root: nn.Module) -> dict:
    """{name: module} of PEFT's adapter layers and wrappers under ``root`` (outermost only); {} without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return {}
    found = {}
    for name, module in root.named_modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)) and not any(
                name.startswith(outer + ".") for outer in found):
            found[name] = module
    return found
