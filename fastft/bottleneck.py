"""fastft.bottleneck: bottleneck adapters (Houlsby / Pfeiffer) in Hugging Face models: apply, save, load, remove.

(Not LoRA: fastft.lora's ``save_adapter`` / ``adapter_state_dict`` are PEFT's LoRA format. The names here
all say "bottleneck" so the two cannot be mixed up; ``fastft.adapters`` is the deprecated old name.)

Where an adapter goes (one per sublayer output, before the residual add):
  * Llama-family decoder layers (LlamaDecoderLayer, and any layer with ``self_attn`` and ``mlp``
    children: Mistral, Qwen2, Gemma, Phi-3, ...): the output of ``self_attn`` (its o_proj output) and
    of ``mlp``, i.e. ``h = residual + adapter(sublayer(norm(h)))``.
  * BERT-family encoder layers (BertLayer, RoBERTa, ELECTRA, ...: ``attention.output`` and ``output``
    with ``dense``, ``dropout`` and ``LayerNorm``): after the output projection's dropout, before the
    residual LayerNorm, ``LayerNorm(adapter(dropout(dense(h))) + input)``, as in Houlsby et al. 2019
    and AdapterHub.
Placement "houlsby" puts one after the attention and one after the feed-forward sublayer of every
block; "pfeiffer" (Pfeiffer et al. 2021) only after the feed-forward one.

Mechanics: each adapter is a child module ``fastft_adapter`` of the sublayer it follows (so it moves
with ``model.to`` and shows in ``named_parameters``) and runs from a forward hook on that sublayer.
The base model's own modules are not replaced, so its state_dict keys are unchanged apart from the
added ``...fastft_adapter.*`` entries; :func:`remove_bottleneck_adapters` deletes hooks and modules and restores
every parameter's ``requires_grad``, giving back exactly the original model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ._fsdp import unsharded_class
from .nn.adapter import Adapter
from .ops.defs.adapter import ACTIVATIONS

PLACEMENTS = ("houlsby", "pfeiffer")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "fastft-bottleneck-adapters"
_CHILD = "fastft_adapter"
_STATE = "_fastft_adapters"


@dataclass(frozen=True)
class BottleneckConfig:
    adapter_size: int = 64
    placement: str = "houlsby"
    activation: str = "relu"
    dropout: float = 0.1
    scale: float = 1.0

    def validate(self) -> None:
        if isinstance(self.adapter_size, bool) or not isinstance(self.adapter_size, int) or self.adapter_size <= 0:
            raise ValueError(f"adapter_size must be a positive int, got {self.adapter_size!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; expected one of {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class _Site:
    name: str  # qualified name of the module that owns the adapter (the sublayer)
    kind: str  # "attention" or "ffn"
    owner: nn.Module  # holds the adapter as child `fastft_adapter`
    hooked: nn.Module  # whose output the adapter transforms
    hidden_size: int
    tuple_output: bool  # the hooked module returns (hidden, ...) rather than a tensor


@dataclass
class BottleneckReport:
    """What :func:`apply_bottleneck_adapters` did: counts like PEFT's ``print_trainable_parameters``."""

    trainable_params: int
    all_params: int
    sites: list

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.all_params, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,} || "
                f"trainable%: {self.trainable_percent:.4f} || adapters: {len(self.sites)}")


class _State:
    def __init__(self, config: BottleneckConfig, sites, handles, requires_grad):
        self.config = config
        self.sites = sites
        self.handles = handles
        self.requires_grad = requires_grad  # parameter name -> flag before apply_bottleneck_adapters


def _linear_out(module: nn.Module, names) -> Optional[int]:
    for n in names:
        sub = getattr(module, n, None)
        if isinstance(sub, nn.Linear):
            return sub.out_features
    return None


def _hidden_from_config(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "hidden_size", None)


def _is_bert_output(m) -> bool:
    return (isinstance(m, nn.Module) and isinstance(getattr(m, "dense", None), nn.Linear)
            and isinstance(getattr(m, "dropout", None), nn.Module) and isinstance(getattr(m, "LayerNorm", None), nn.Module))


def find_sites(model: nn.Module) -> list[_Site]:
    """Every (attention, ffn) insertion point of the model's blocks, in module order."""
    fallback_hidden = _hidden_from_config(model)
    sites: list[_Site] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if isinstance(attn, nn.Module) and isinstance(mlp, nn.Module):  # Llama-family decoder layer
            h_attn = _linear_out(attn, ("o_proj", "out_proj", "dense")) or fallback_hidden
            h_mlp = _linear_out(mlp, ("down_proj", "fc2", "dense_4h_to_h")) or fallback_hidden
            if h_attn is None or h_mlp is None:
                continue
            sites.append(_Site(prefix + "self_attn", "attention", attn, attn, h_attn, True))
            sites.append(_Site(prefix + "mlp", "ffn", mlp, mlp, h_mlp, False))
            continue
        attention, output = getattr(m, "attention", None), getattr(m, "output", None)
        self_output = getattr(attention, "output", None) if isinstance(attention, nn.Module) else None
        if _is_bert_output(self_output) and _is_bert_output(output):  # BERT-family encoder layer
            sites.append(_Site(prefix + "attention.output", "attention", self_output, self_output.dropout,
                               self_output.dense.out_features, False))
            sites.append(_Site(prefix + "output", "ffn", output, output.dropout, output.dense.out_features, False))
    return sites


def _hook(adapter: nn.Module, tuple_output: bool):
    if tuple_output:
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (adapter(output[0]),) + tuple(output[1:])
            return adapter(output)
    else:
        def hook(_module, _args, output):
            return adapter(output)
    return hook


def has_bottleneck_adapters(model: nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


def apply_bottleneck_adapters(
    model: nn.Module,
    adapter_size: int = 64,
    placement: str = "houlsby",
    *,
    activation: str = "relu",
    dropout: float = 0.1,
    scale: float = 1.0,
    freeze_base: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> BottleneckReport:
    """Insert a bottleneck adapter after the attention and/or feed-forward output of every block of a
    Hugging Face model (in place), freeze the base model's parameters, and report the trainable counts.

    ``placement``: "houlsby" (after attention and feed-forward) or "pfeiffer" (after feed-forward only).
    Adapters are created on the device of the sublayer they follow, in ``dtype`` (default: fp32 when the
    base is fp16/bf16, as PEFT keeps adapter weights, else the base dtype); the op runs in the
    activations' dtype. Raises ValueError for a bad option or a model with no block it knows.
    """
    config = BottleneckConfig(adapter_size, placement, activation, float(dropout), float(scale))
    config.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if has_bottleneck_adapters(model):
        raise ValueError("the model already has fastft bottleneck adapters; call remove_bottleneck_adapters(model) first")
    sites = find_sites(model)
    if not sites:
        raise ValueError(
            f"apply_bottleneck_adapters: found no transformer blocks in {type(model).__name__}: looked for Llama-style "
            "decoder layers (children 'self_attn' and 'mlp') and BERT-style encoder layers (children 'attention.output' and "
            "'output', each with 'dense', 'dropout' and 'LayerNorm')"
        )
    if placement == "pfeiffer":
        sites = [s for s in sites if s.kind == "ffn"]
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    handles = []
    for site in sites:
        ref = next(site.owner.parameters(), None)
        device = ref.device if ref is not None else None
        want = dtype
        if want is None:
            base = ref.dtype if ref is not None else torch.float32
            want = torch.float32 if base in (torch.float16, torch.bfloat16) else base
        adapter = Adapter(site.hidden_size, adapter_size, activation, dropout, scale=scale, device=device, dtype=want)
        site.owner.add_module(_CHILD, adapter)
        handles.append(site.hooked.register_forward_hook(_hook(adapter, site.tuple_output)))
    setattr(model, _STATE, _State(config, sites, handles, requires_grad))
    return trainable_report(model)


def bottleneck_adapters(model: nn.Module) -> list[Adapter]:
    """The model's adapter modules, in site order."""
    return [getattr(site.owner, _CHILD) for site in _require(model).sites]


def trainable_report(model: nn.Module) -> BottleneckReport:
    state = getattr(model, _STATE, None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return BottleneckReport(trainable, total, [s.name for s in state.sites] if state else [])


def bottleneck_state_dict(model: nn.Module) -> dict:
    """The adapters' tensors, keyed by their names in the model (``...fastft_adapter.down.weight``)."""
    _require(model)
    return {n: p.detach() for n, p in model.named_parameters() if f".{_CHILD}." in f".{n}"}


def remove_bottleneck_adapters(model: nn.Module) -> nn.Module:
    """Delete every adapter and hook and restore each parameter's ``requires_grad``: the model's outputs
    and state_dict keys are exactly those it had before :func:`apply_bottleneck_adapters`."""
    state = _require(model)
    for handle in state.handles:
        handle.remove()
    for site in state.sites:
        if hasattr(site.owner, _CHILD):
            delattr(site.owner, _CHILD)
    for n, p in model.named_parameters():
        if n in state.requires_grad:
            p.requires_grad_(state.requires_grad[n])
    delattr(model, _STATE)
    return model



def _require(model: nn.Module) -> _State:
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no fastft bottleneck adapters (apply_bottleneck_adapters was not called)")
    return state


def save_bottleneck_adapters(model: nn.Module, directory: str, *, tensors: Optional[dict] = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (the adapters' tensors only).
    ``tensors``: the adapters' full tensors when the model's own are sharded (gathered by the caller,
    e.g. ``DTensor.full_tensor()`` on every rank); by default :func:`bottleneck_state_dict`."""
    from safetensors.torch import save_file

    state = _require(model)
    os.makedirs(directory, exist_ok=True)
    tensors = {n: t.contiguous().cpu() for n, t in (tensors if tensors is not None else bottleneck_state_dict(model)).items()}
    meta = {
        "format": FORMAT,
        "base_model_class": unsharded_class(model).__name__,
        "hidden_sizes": {s.name: s.hidden_size for s in state.sites},
        **dataclasses.asdict(state.config),
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def load_bottleneck_adapters(model: nn.Module, directory: str, *, freeze_base: bool = True) -> BottleneckReport:
    """Insert the adapters saved by :func:`save_bottleneck_adapters` into ``model`` (a model of the same
    architecture without adapters) and load their weights. ValueError when the sites or sizes differ."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}/{CONFIG_NAME} is not a fastft adapter config (format {meta.get('format')!r})")
    config = BottleneckConfig(**{k.name: meta[k.name] for k in dataclasses.fields(BottleneckConfig)})
    sites = {s.name: s.hidden_size for s in find_sites(model)}
    for name, hidden in meta["hidden_sizes"].items():
        if name not in sites:
            raise ValueError(f"the saved adapters were for a block at {name!r}, which {type(model).__name__} lacks")
        if sites[name] != hidden:
            raise ValueError(f"hidden size mismatch at {name}: the saved adapter has {hidden}, the model {sites[name]}")
    report = apply_bottleneck_adapters(model, freeze_base=freeze_base, **dataclasses.asdict(config))
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    params = dict(model.named_parameters())
    expected = set(bottleneck_state_dict(model))
    if set(tensors) != expected:
        remove_bottleneck_adapters(model)
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter weights do not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                remove_bottleneck_adapters(model)
                raise ValueError(f"{n}: saved shape {tuple(t.shape)} != model shape {tuple(params[n].shape)}")
            params[n].copy_(t)
    return report
