"""Bottleneck adapters (Houlsby / Pfeiffer) in Hugging Face models: ``apply`` -> handle, ``load``.

PEFT has no such method, so the files are fastft's own format, under their own names
(``bottleneck_config.json`` + ``bottleneck_model.safetensors``; folders written before by the name
``adapter_config.json`` / ``adapter_model.safetensors`` are still read). ``fused=False`` runs the same
block in eager torch (the stock baseline). There is nothing to merge: ``handle.merge()`` raises.

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
added ``...fastft_adapter.*`` entries; ``handle.remove()`` deletes hooks and modules, giving back exactly the original model.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..._fsdp import unsharded_class
from ...nn.adapter import Adapter
from ..base import BOTTLENECK_CONFIG_NAME, BOTTLENECK_WEIGHTS_NAME, TunerHandle, applying, read_json, unwrap
from .config import BottleneckConfig

FORMAT = "fastft-bottleneck-adapters"
ADAPTER_CHILD = "fastft_adapter"  # the child module name of each adapter in the sublayer it follows
# the names fastft wrote before the format had its own (read, never written: PEFT owns adapter_config.json)
OLD_CONFIG_NAME = "adapter_config.json"
OLD_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AdapterSite:
    name: str  # qualified name of the module that owns the adapter (the sublayer)
    kind: str  # "attention" or "ffn"
    owner: nn.Module  # holds the adapter as child `fastft_adapter`
    hooked: nn.Module  # whose output the adapter transforms
    hidden_size: int
    tuple_output: bool  # the hooked module returns (hidden, ...) rather than a tensor


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


def find_sites(model: nn.Module) -> list[AdapterSite]:
    """Every (attention, ffn) insertion point of the model's blocks, in module order."""
    fallback_hidden = _hidden_from_config(model)
    sites: list[AdapterSite] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if isinstance(attn, nn.Module) and isinstance(mlp, nn.Module):  # Llama-family decoder layer
            h_attn = _linear_out(attn, ("o_proj", "out_proj", "dense")) or fallback_hidden
            h_mlp = _linear_out(mlp, ("down_proj", "fc2", "dense_4h_to_h")) or fallback_hidden
            if h_attn is None or h_mlp is None:
                continue
            sites.append(AdapterSite(prefix + "self_attn", "attention", attn, attn, h_attn, True))
            sites.append(AdapterSite(prefix + "mlp", "ffn", mlp, mlp, h_mlp, False))
            continue
        attention, output = getattr(m, "attention", None), getattr(m, "output", None)
        self_output = getattr(attention, "output", None) if isinstance(attention, nn.Module) else None
        if _is_bert_output(self_output) and _is_bert_output(output):  # BERT-family encoder layer
            sites.append(AdapterSite(prefix + "attention.output", "attention", self_output, self_output.dropout,
                               self_output.dense.out_features, False))
            sites.append(AdapterSite(prefix + "output", "ffn", output, output.dropout, output.dense.out_features, False))
    return sites


class AdapterHook:
    """The forward hook that runs an adapter on its sublayer's output (the first element of a tuple
    output). An object rather than a closure: a deepcopy of the model copies it with the model, so the
    copy runs its own adapter."""

    def __init__(self, adapter: nn.Module, tuple_output: bool) -> None:
        self.adapter = adapter
        self.tuple_output = tuple_output

    def __call__(self, _module, _args, output):
        if self.tuple_output and isinstance(output, tuple):
            return (self.adapter(output[0]),) + tuple(output[1:])
        return self.adapter(output)


class BottleneckHandle(TunerHandle):
    """Bottleneck adapters on a model (see :class:`fastft.tuners.TunerHandle`). No ``merge``: an adapter
    is a nonlinear block, not a weight delta."""

    method = "bottleneck"
    config_name = BOTTLENECK_CONFIG_NAME
    weights_name = BOTTLENECK_WEIGHTS_NAME

    def __init__(self, model: nn.Module, config: BottleneckConfig, *, fused: bool, sites: list, hooks: list) -> None:
        super().__init__(model, config, fused=fused)
        self.sites = sites
        self.hooks = hooks

    def adapters(self) -> list:
        """The adapter modules, in site order."""
        return [getattr(site.owner, ADAPTER_CHILD) for site in self.sites]

    def parameters(self) -> dict:
        return {f"{site.name}.{ADAPTER_CHILD}.{n}": p for site in self.sites
                for n, p in getattr(site.owner, ADAPTER_CHILD).named_parameters()}

    def _modules(self) -> list:
        return [site.name for site in self.sites]

    def _file_tensors(self) -> dict:
        return {n: p.detach() for n, p in self.parameters().items()}

    def _file_config(self) -> dict:
        return {"format": FORMAT, "base_model_class": unsharded_class(self.root).__name__,
                "hidden_sizes": {s.name: s.hidden_size for s in self.sites}, **dataclasses.asdict(self.config)}

    def _detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for site in self.sites:
            if hasattr(site.owner, ADAPTER_CHILD):
                delattr(site.owner, ADAPTER_CHILD)


def apply(model: nn.Module, config: BottleneckConfig = BottleneckConfig(), *, fused: bool = True,
          dtype: Optional[torch.dtype] = None) -> BottleneckHandle:
    """Insert a bottleneck adapter after the attention and/or feed-forward output of every block of a
    Hugging Face model (in place), freeze the base model, and return the handle.

    ``fused``: fastft's fused adapter op (default) or, False, the same block in eager torch. Adapters are
    created on the device of the sublayer they follow, in ``dtype`` (default: fp32 when the base is
    fp16/bf16, as PEFT keeps adapter weights, else the base dtype); the op runs in the activations'
    dtype. Raises ValueError for a model with no block it knows."""
    with applying(model, BottleneckHandle.method, config, BottleneckConfig) as root:
        sites = find_sites(root)
        if not sites:
            raise ValueError(
                f"bottleneck adapters: found no transformer blocks in {type(root).__name__}: looked for Llama-style "
                "decoder layers (children 'self_attn' and 'mlp') and BERT-style encoder layers (children "
                "'attention.output' and 'output', each with 'dense', 'dropout' and 'LayerNorm')"
            )
        if config.placement == "pfeiffer":
            sites = [s for s in sites if s.kind == "ffn"]
        hooks = []
        for site in sites:
            ref = next(site.owner.parameters(), None)
            device = ref.device if ref is not None else None
            want = dtype
            if want is None:
                base = ref.dtype if ref is not None else torch.float32
                want = torch.float32 if base in (torch.float16, torch.bfloat16) else base
            adapter = Adapter(site.hidden_size, config.adapter_size, config.activation, config.dropout,
                              scale=config.scale, fused=fused, device=device, dtype=want)
            site.owner.add_module(ADAPTER_CHILD, adapter)
            hooks.append(site.hooked.register_forward_hook(AdapterHook(adapter, site.tuple_output)))
        return BottleneckHandle(model, config, fused=fused, sites=sites, hooks=hooks).register()


def load(model: nn.Module, directory: str, *, trainable: bool = False, fused: bool = True) -> BottleneckHandle:
    """Insert the adapters saved by ``handle.save`` into ``model`` (a model of the same architecture
    without them) and load their weights; frozen unless ``trainable``. ValueError when the sites or
    sizes differ."""
    from safetensors.torch import load_file

    config_name, weights_name = BOTTLENECK_CONFIG_NAME, BOTTLENECK_WEIGHTS_NAME
    if not os.path.exists(os.path.join(directory, config_name)):
        config_name, weights_name = OLD_CONFIG_NAME, OLD_WEIGHTS_NAME
    if not os.path.exists(os.path.join(directory, config_name)):
        raise FileNotFoundError(f"no {BOTTLENECK_CONFIG_NAME} in {directory}")
    meta = read_json(os.path.join(directory, config_name))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}/{config_name} is not a fastft bottleneck config (format {meta.get('format')!r})")
    config = BottleneckConfig(**{k.name: meta[k.name] for k in dataclasses.fields(BottleneckConfig)})
    sites = {s.name: s.hidden_size for s in find_sites(unwrap(model))}
    for name, hidden in meta["hidden_sizes"].items():
        if name not in sites:
            raise ValueError(f"the saved adapters were for a block at {name!r}, which {type(model).__name__} lacks")
        if sites[name] != hidden:
            raise ValueError(f"hidden size mismatch at {name}: the saved adapter has {hidden}, the model {sites[name]}")
    tensors = load_file(os.path.join(directory, weights_name))
    handle = apply(model, config, fused=fused)
    params = handle.parameters()
    if set(tensors) != set(params):
        handle.remove()
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"adapter weights do not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                handle.remove()
                raise ValueError(f"{n}: saved shape {tuple(t.shape)} != model shape {tuple(params[n].shape)}")
            params[n].copy_(t)
    handle.set_trainable(trainable)
    return handle
