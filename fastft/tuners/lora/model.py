"""LoRA (Hu et al. 2021) on a whole model, interchangeable with PEFT.

    handle = lora.apply(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ... train ...
    handle.save("out/")                    # PEFT's format: PeftModel.from_pretrained(base, "out/") loads it
    lora.load(model, "peft_adapter/")      # an adapter PEFT saved (frozen unless trainable=True, as PEFT)
    from_peft(peft_model)                  # swap PEFT's LoRA layers for fastft's fused ones, in place
    handle.merge()  /  merge_and_unload(model)   # plain nn.Linear layers with the adapter folded in

``apply`` also takes a ``peft.LoraConfig``. ``fused=False`` puts PEFT's own LoRA layers in (the stock
baseline: ``peft.inject_adapter_in_model``, the layers and random draws of ``get_peft_model`` without its
wrapper); the handle saves, removes and merges them the same way. Targets follow PEFT's rules: a list
entry matches a module whose qualified name equals it or ends with "." + it; a string is a regex matched
against the whole qualified name; "all-linear" is every nn.Linear but the output layer. Differences from
PEFT, on purpose: a list entry that matches nothing is an error (a typo would otherwise silently train
less), and ``modules_to_save`` modules are trained in place (PEFT trains a copy so the adapter can be
disabled); their saved keys are PEFT's all the same.
"""
from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from ...nn.lora import LoRALinear
from ..base import (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_WEIGHTS_NAME_BIN, TunerHandle, applying, handles,
                    read_json, unwrap)
from .config import ALL_LINEAR, LoraConfig, as_lora_config

PEFT_KEY_PREFIX = "base_model.model."  # PEFT's state-dict keys: the PeftModel's path to the transformers model
PEFT_ADAPTER = "default"  # the adapter name of PEFT's layers when fused=False

# PEFT's default targets when target_modules is None (peft.utils.constants, LoRA), for common models.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
}


# ------------------------------------------------------------------------------------------------
# Targeting
# ------------------------------------------------------------------------------------------------


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
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"target_modules is None and fastft knows no default targets for model_type {model_type!r}; "
                         "pass target_modules (a list of names, a regex, or 'all-linear')")
    return DEFAULT_TARGETS[model_type]


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
    """{qualified name: layer} of the LoRA layers under ``model`` (names relative to the transformers
    model): fastft's LoRALinear, and PEFT's LoRA layers where peft is installed."""
    root = unwrap(model)
    kinds = (LoRALinear,) + _peft_lora_layer_class()
    return {n: m for n, m in root.named_modules() if isinstance(m, kinds)}


def _peft_lora_layer_class() -> tuple:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return ()
    return (LoraLayer,)


def _modules_to_save(root: nn.Module, config: LoraConfig) -> list:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in root.named_modules() if n and _matches(n, list(config.modules_to_save))]
    for t in config.modules_to_save:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"modules_to_save entry {t!r} matches no module")
    return names


def _lora_tensors(root: nn.Module, config: LoraConfig):
    """(name in the model, PEFT's key, tensor) of what LoRA owns: every layer's A and B, the biases
    ``config.bias`` names, the ``modules_to_save`` modules' parameters and buffers (buffers: name None)."""
    for name, layer in lora_layers(root).items():
        for ab in ("lora_A", "lora_B"):
            if isinstance(layer, LoRALinear):
                yield f"{name}.{ab}", f"{PEFT_KEY_PREFIX}{name}.{ab}.weight", getattr(layer, ab)
            else:  # PEFT's layer: ModuleDicts of Linears, one adapter
                weight = getattr(layer, ab)[PEFT_ADAPTER].weight
                yield f"{name}.{ab}.{PEFT_ADAPTER}.weight", f"{PEFT_KEY_PREFIX}{name}.{ab}.weight", weight
        if config.bias == "lora_only" and layer.base_layer.bias is not None:
            yield f"{name}.base_layer.bias", f"{PEFT_KEY_PREFIX}{name}.base_layer.bias", layer.base_layer.bias
    if config.bias == "all":
        for name, p in root.named_parameters():
            if name.split(".")[-1] == "bias":
                yield name, f"{PEFT_KEY_PREFIX}{name}", p
    for module_name in _modules_to_save(root, config):
        module = root.get_submodule(module_name)
        params = dict(module.named_parameters())
        for key, t in module.state_dict(keep_vars=True).items():
            yield (f"{module_name}.{key}" if key in params else None), f"{PEFT_KEY_PREFIX}{module_name}.{key}", t


# ------------------------------------------------------------------------------------------------
# apply / the handle
# ------------------------------------------------------------------------------------------------


class LoraHandle(TunerHandle):
    """LoRA on a model (see :class:`fastft.tuners.TunerHandle`); ``merge()`` folds it into the base weights."""

    method = "lora"

    def parameters(self) -> dict:
        return {name: t for name, _, t in _lora_tensors(self.root, self.config) if name is not None}

    def _modules(self) -> list:
        return list(lora_layers(self.root))

    def _file_tensors(self) -> dict:
        return adapter_state_dict(self.root, self.config)

    def _file_config(self) -> dict:
        return self.config.to_peft_dict()

    def _detach(self) -> None:
        root = self.root
        for name, layer in lora_layers(root).items():
            _set_submodule(root, name, layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer)
        if not self.fused and "peft_config" in vars(root):
            del root.peft_config  # set by peft.inject_adapter_in_model

    def merge(self) -> nn.Module:
        """Fold every adapter into its base weight and put the plain nn.Linear layers back (the method is
        then removed). Returns the transformers model."""
        for layer in lora_layers(self.root).values():
            layer.merge()
        return self.remove()


def apply(model: nn.Module, config, *, fused: bool = True, verbose: bool = False) -> LoraHandle:
    """Wrap every targeted nn.Linear of ``model`` in a LoRA layer (in place), freeze the base model and
    return the handle. ``config``: fastft's or PEFT's LoraConfig. ``fused``: fastft's fused LoRALinear
    (default) or, False, PEFT's own LoRA layers (the stock baseline). ``verbose`` prints the report."""
    config = as_lora_config(config)
    with applying(model, LoraHandle.method) as root:
        if lora_layers(root):
            raise ValueError("model already has LoRA layers; merge_and_unload() it first (one adapter per model)")
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
        if fused:
            for name in find_targets(root, config):
                layer = LoRALinear(root.get_submodule(name), config.r, config.lora_alpha, config.lora_dropout,
                                   config.use_rslora, init_lora_weights=False)
                if config.init_lora_weights:
                    _init_like_peft(layer)
                _set_submodule(root, name, layer)
        else:
            _inject_peft_layers(root, config)
        handle = LoraHandle(model, config, fused=fused).register()
    if verbose:
        print(handle.report)
    return handle


def _inject_peft_layers(root: nn.Module, config: LoraConfig) -> None:
    import peft

    if config.modules_to_save:
        raise ValueError("modules_to_save with fused=False: PEFT's injected layers train copies fastft does not "
                         "save; use fused=True")
    find_targets(root, config)  # fastft's checks of the targets (a list entry that matches nothing)
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
              "init_lora_weights", "task_type")
    peft_config = peft.LoraConfig(**{f: getattr(config, f) for f in fields})
    peft.inject_adapter_in_model(peft_config, root, adapter_name=PEFT_ADAPTER)


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


# ------------------------------------------------------------------------------------------------
# PEFT's file format
# ------------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, config: LoraConfig = None) -> dict:
    """The adapter's tensors under PEFT's key names (``base_model.model.<path>.lora_A.weight``, ...), for
    fastft's and PEFT's LoRA layers alike. ``config``: the handle's (default: the model's LoRA handle)."""
    root = unwrap(model)
    config = config if config is not None else handles(root)["lora"].config
    return {key: t.detach() for _, key, t in _lora_tensors(root, config)}


def _read_adapter_weights(directory: str) -> dict:
    path = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if os.path.exists(path):
        from safetensors.torch import load_file

        return load_file(path)
    path = os.path.join(directory, PEFT_WEIGHTS_NAME_BIN)
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {PEFT_WEIGHTS_NAME} or {PEFT_WEIGHTS_NAME_BIN} in {directory}")


def load(model: nn.Module, directory: str, *, trainable: bool = False, fused: bool = True) -> LoraHandle:
    """Apply the LoRA adapter saved in ``directory`` (by PEFT or by ``handle.save``) to ``model``: LoRA per
    the saved adapter_config.json, then the saved tensors. Every saved tensor must find its place (and
    every adapter parameter must be saved). Frozen unless ``trainable`` (PEFT's ``is_trainable``)."""
    config_path = os.path.join(directory, PEFT_CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {PEFT_CONFIG_NAME} in {directory}")
    config = LoraConfig.from_dict(read_json(config_path))
    saved = _read_adapter_weights(directory)
    handle = apply(model, config, fused=fused)
    try:
        _copy_adapter_weights(handle, saved, directory)
    except ValueError:
        handle.remove()
        raise
    handle.set_trainable(trainable)
    return handle


def _copy_adapter_weights(handle: LoraHandle, saved: dict, directory: str) -> None:
    root = handle.root
    layers = lora_layers(root)
    params = dict(root.named_parameters())
    buffers = dict(root.named_buffers())
    expected = set()
    with torch.no_grad():
        for key, value in saved.items():
            if not key.startswith(PEFT_KEY_PREFIX):
                raise ValueError(f"unexpected key {key!r} in the adapter (PEFT keys start with {PEFT_KEY_PREFIX!r})")
            name = key[len(PEFT_KEY_PREFIX):]
            m = re.fullmatch(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
            if m and m.group(1) in layers:
                layer, ab = layers[m.group(1)], f"lora_{m.group(2)}"
                target = getattr(layer, ab) if isinstance(layer, LoRALinear) else getattr(layer, ab)[PEFT_ADAPTER].weight
                expected.add(f"{m.group(1)}.{ab}")
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


# ------------------------------------------------------------------------------------------------
# PEFT models, merging
# ------------------------------------------------------------------------------------------------


def layer_from_peft(module: nn.Module) -> LoRALinear:
    """A fastft LoRALinear computing what the PEFT LoRA layer ``module`` computes, on the same base layer
    and the same lora_A / lora_B parameter objects (shared, not copied), with the same scaling and
    dropout. ValueError, with the reason, when fastft cannot: more than one adapter, a base that is not an
    nn.Linear, DoRA, fan_in_fan_out, a merged layer, lora_bias."""
    adapters = list(module.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(f"one adapter per layer is supported, found {adapters}")
    adapter = adapters[0]
    base = module.get_base_layer()
    if not isinstance(base, nn.Linear) or not isinstance(module.lora_A[adapter], nn.Linear):
        raise ValueError(f"only LoRA on nn.Linear is supported, got base {type(base).__name__}")
    if module.use_dora.get(adapter, False) or getattr(module, "fan_in_fan_out", False):
        raise ValueError("DoRA and fan_in_fan_out layers are not supported by fastft")
    if module.merged:
        raise ValueError("the PEFT layer is merged; unmerge it first")
    if module.lora_A[adapter].bias is not None or module.lora_B[adapter].bias is not None:
        raise ValueError("LoRA with lora_bias=True is not supported by fastft")
    dropout = module.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    layer = LoRALinear.from_parameters(
        base, module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter]), p,
        lora_alpha=module.lora_alpha[adapter], use_rslora=bool(module.use_rslora.get(adapter, False)),
    )
    layer.train(module.training)
    return layer


def from_peft(peft_model: nn.Module) -> "LoraHandle":
    """Swap every PEFT LoRA Linear (one adapter each) of ``peft_model`` for a fastft LoRALinear in place
    (:func:`layer_from_peft`: the same parameter objects, so an optimizer built on them keeps working).
    Returns the LoRA handle (``.save`` writes PEFT's format; PEFT's own ``save_pretrained`` looks for its
    layer classes). The parameters' ``requires_grad`` stay as PEFT set them."""
    from peft.tuners.lora import LoraLayer

    peft_config = getattr(peft_model, "peft_config", None)
    if not (isinstance(peft_config, dict) and len(peft_config) == 1):
        raise ValueError(f"from_peft takes a PeftModel with one LoRA adapter, got {type(peft_model).__name__} "
                         f"with peft_config {peft_config!r}")
    config = as_lora_config(next(iter(peft_config.values())))
    with applying(peft_model, LoraHandle.method) as root:
        swapped = 0
        for name, module in list(root.named_modules()):
            if isinstance(module, LoraLayer):
                try:
                    _set_submodule(root, name, layer_from_peft(module))
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
                swapped += 1
        if swapped == 0:
            raise ValueError(f"no PEFT LoRA layer found in {type(peft_model).__name__}")
        return LoraHandle(peft_model, config, fused=True).register(trainable=None)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and put the plain nn.Linear back; returns the
    unwrapped model (the transformers model for a PeftModel, as PEFT's merge_and_unload does).

    Both kinds of LoRA layer are merged: fastft's LoRALinear and PEFT's own LoRA layers (a PeftModel
    straight from ``get_peft_model``, or one partly swapped by :func:`from_peft`). A PeftModel is
    finished by PEFT's own ``merge_and_unload`` (it also unwraps ``modules_to_save`` copies). A plain
    model holding PEFT layers of another kind than LoRA raises ValueError rather than keep them."""
    root = unwrap(model)
    handle = handles(root).get(LoraHandle.method)
    if handle is not None:
        handle.merge()
    for name, layer in lora_layers(root).items():  # fastft layers no handle owns (built by hand)
        if not isinstance(layer, LoRALinear):
            continue  # PEFT's, merged below
        layer.merge()
        _set_submodule(root, name, layer.base_layer)
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
