"""Prefix tuning (Li & Liang 2021) for Hugging Face decoders, interchangeable with PEFT's.

Per layer, ``num_virtual_tokens`` trainable key/value vectors are put in front of the keys and values
the model attends to. They are fed through the model's cache interface, exactly as PEFT 0.21 does:
a ``DynamicCache`` pre-filled with the prefix is passed as ``past_key_values`` (so positions of the
real tokens start after the prefix and every layer attends to it), and the attention mask gets
``num_virtual_tokens`` leading ones. The prefix is produced by :class:`PrefixEncoder`, which has the
layout and state_dict keys of ``peft.tuners.prefix_tuning.PrefixEncoder`` (an embedding of
[num_virtual_tokens, num_layers * 2 * token_dim], or with ``prefix_projection`` a token embedding and
a two-layer tanh MLP), where ``token_dim = head_dim * num_key_value_heads`` (grouped-query attention).
Given the same prefix parameters, logits match PEFT's.

``fused=False`` applies PEFT's own prefix tuning instead (the stock baseline): PEFT implements it in its
``PeftModel`` wrapper, so that handle's ``.model`` is the ``PeftModel`` to call.

Files: ``handle.save`` writes PEFT's adapter format (``adapter_config.json`` +
``adapter_model.safetensors`` holding ``prompt_embeddings``, the flattened prefix), which
``PeftModel.from_pretrained`` loads; :func:`load` reads it (also what PEFT's ``save_pretrained``
wrote). As in PEFT, a projected prefix is saved as its output, so it comes back as a plain
(non-projected) prefix. There is nothing to merge: ``handle.merge()`` raises.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..base import (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, TunerHandle, applying, gather_full, is_sharded, read_json,
                    unwrap)
from .config import PrefixTuningConfig

ENCODER_CHILD = "fastft_prefix_encoder"  # the encoder's child module name in the model (fused=True)
PEFT_ADAPTER = "default"  # the adapter name of PEFT's prefix (fused=False)


class PrefixEncoder(nn.Module):
    """The prefix: ``forward() -> [num_virtual_tokens, num_layers * 2 * token_dim]``. Same parameters,
    names and initialisation as PEFT's PrefixEncoder."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_layers: int, prefix_projection: bool = False,
                 encoder_hidden_size: Optional[int] = None, device=None) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = token_dim
        self.num_layers = num_layers
        self.prefix_projection = prefix_projection
        self.encoder_hidden_size = encoder_hidden_size or token_dim
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, self.encoder_hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(self.encoder_hidden_size, num_layers * 2 * token_dim, device=device),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, num_layers * 2 * token_dim, device=device)

    def forward(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


@dataclass
class PrefixGeometry:
    num_layers: int
    num_heads: int  # key/value heads
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.num_heads * self.head_dim


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: prefix tuning needs a Hugging Face model")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def geometry(model: nn.Module) -> PrefixGeometry:
    """Layers, key/value heads and head size of the model's attention, as PEFT derives them."""
    c = _text_config(model)
    num_layers = getattr(c, "num_hidden_layers", None)
    hidden = getattr(c, "hidden_size", None)
    heads = getattr(c, "num_attention_heads", None)
    if num_layers is None or hidden is None or heads is None:
        raise ValueError(
            f"cannot find the attention geometry of {type(model).__name__}: its config needs num_hidden_layers, "
            f"hidden_size and num_attention_heads (got {num_layers}, {hidden}, {heads})"
        )
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return PrefixGeometry(num_layers, kv_heads, head_dim)


def _prefix_cache(model: nn.Module, encoder: PrefixEncoder, g: PrefixGeometry, batch_size: int, cache=None):
    """A DynamicCache holding the prefix for every layer (or ``cache``, an empty one, filled with it)."""
    from transformers import DynamicCache

    enc = encoder
    kv = enc()
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        kv = kv.to(dtype)
    kv = kv.unsqueeze(0).expand(batch_size, -1, -1)
    kv = kv.view(batch_size, enc.num_virtual_tokens, g.num_layers * 2, g.num_heads, g.head_dim)
    # [layers * 2, batch, heads, tokens, head_dim], then (key, value) per layer: PEFT's get_prompt layout
    kv = kv.permute(2, 0, 3, 1, 4).split(2)
    pairs = [(layer[0], layer[1]) for layer in kv]
    if cache is None:
        return DynamicCache(pairs)
    positions = torch.arange(enc.num_virtual_tokens, device=pairs[0][0].device)
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i, cache_kwargs={"cache_position": positions})
    return cache


def _pre_hook(model: nn.Module, g: PrefixGeometry):
    signature = inspect.signature(model.forward)

    def hook(module, args, kwargs):
        encoder = module.get_submodule(ENCODER_CHILD)  # looked up per call: a deepcopy of the model uses its own
        bound = signature.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        extra = kw.pop("kwargs", None)
        if extra:
            kw.update(extra)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        batch = ref.shape[0]
        t = encoder.num_virtual_tokens
        past = kw.get("past_key_values")
        fresh = past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0)
        if not fresh:
            # Generation after the first step: the prefix is already in the cache; only the mask needs it.
            mask = kw.get("attention_mask")
            if mask is not None and mask.dim() == 2 and mask.shape[1] == past.get_seq_length() - t + ref.shape[1]:
                kw["attention_mask"] = torch.cat([mask.new_ones(batch, t), mask], dim=1)
            return (), kw
        kw["past_key_values"] = _prefix_cache(module, encoder, g, batch, past)
        mask = kw.get("attention_mask")
        if mask is not None:
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, t), mask], dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + t
        return (), kw

    return hook


class PrefixHandle(TunerHandle):
    """Prefix tuning on a model (see :class:`fastft.tuners.TunerHandle`). No ``merge``: a prefix is extra
    keys and values, not a weight delta."""

    method = "prefix"

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, *, fused: bool, geometry: PrefixGeometry,
                 hook=None) -> None:
        super().__init__(model, config, fused=fused)
        self.geometry = geometry
        self.hook = hook

    @property
    def encoder(self) -> nn.Module:
        """The module producing the prefix: fastft's PrefixEncoder, or PEFT's (fused=False)."""
        if self.fused:
            return self.root.get_submodule(ENCODER_CHILD)
        return self.model.prompt_encoder[PEFT_ADAPTER]

    def parameters(self) -> dict:
        prefix = ENCODER_CHILD if self.fused else f"prompt_encoder.{PEFT_ADAPTER}"
        return {f"{prefix}.{n}": p for n, p in self.encoder.named_parameters()}

    def _modules(self) -> list:
        return [ENCODER_CHILD if self.fused else f"prompt_encoder.{PEFT_ADAPTER}"]

    def _file_tensors(self) -> dict:
        encoder = self.encoder
        own = dict(encoder.named_parameters())
        if not self.fused and any(is_sharded(p) for p in own.values()):
            raise NotImplementedError("saving PEFT's prefix (fused=False) from a sharded model: use fastft's "
                                      "(fused=True; the runtime's kernels.prefix = true)")
        full = gather_full(own)  # the prefix is computed from whole parameters (they may be sharded)
        with torch.no_grad():
            prompt = torch.func.functional_call(encoder, full, ()) if self.fused else \
                self.model.get_prompt_embedding_to_save(adapter_name=PEFT_ADAPTER).cpu()
        return {"prompt_embeddings": prompt.detach().float().contiguous()}

    def _file_config(self) -> dict:
        return self.config.to_peft_dict(self.geometry, self.config.encoder_hidden_size or self.geometry.token_dim,
                                        getattr(getattr(self.root, "config", None), "_name_or_path", None) or None)

    def _detach(self) -> None:
        if self.fused:
            self.hook.remove()
            delattr(self.root, ENCODER_CHILD)
        self.model = self.root  # PEFT's wrapper (fused=False) is dropped: the transformers model is as before


def apply(model: nn.Module, config: PrefixTuningConfig = PrefixTuningConfig(), *, fused: bool = True) -> PrefixHandle:
    """Add trainable key/value prefixes to a Hugging Face causal LM, freeze the base model, return the
    handle. ``fused``: fastft's prefix (in place, default) or, False, PEFT's (``handle.model`` is then the
    ``PeftModel`` wrapping ``model``)."""
    with applying(model, PrefixHandle.method, config, PrefixTuningConfig) as root:
        g = geometry(root)
        if not fused:
            return PrefixHandle(_wrap_peft(root, config), config, fused=False, geometry=g).register()
        ref = next(root.parameters(), None)
        encoder = PrefixEncoder(config.num_virtual_tokens, g.token_dim, g.num_layers, config.prefix_projection,
                                config.encoder_hidden_size, device=ref.device if ref is not None else None)
        root.add_module(ENCODER_CHILD, encoder)
        hook = root.register_forward_pre_hook(_pre_hook(root, g), with_kwargs=True)
        return PrefixHandle(model, config, fused=True, geometry=g, hook=hook).register()


def _wrap_peft(root: nn.Module, config: PrefixTuningConfig) -> nn.Module:
    """PEFT's prefix tuning around ``root``. get_peft_model freezes every parameter but its prefix: the
    flags of the methods applied before are put back (the shared freeze rule runs after)."""
    import peft

    flags = [(p, p.requires_grad) for p in root.parameters()]
    kwargs = {"encoder_hidden_size": config.encoder_hidden_size} if config.encoder_hidden_size else {}
    wrapped = peft.get_peft_model(root, peft.PrefixTuningConfig(
        num_virtual_tokens=config.num_virtual_tokens, prefix_projection=config.prefix_projection,
        task_type=config.task_type, **kwargs))
    for p, flag in flags:
        p.requires_grad_(flag)
    return wrapped


def load(model: nn.Module, directory: str, *, trainable: bool = False, fused: bool = True) -> PrefixHandle:
    """Apply the prefix saved in PEFT's format (by ``handle.save`` or PEFT's ``save_pretrained``); frozen
    unless ``trainable`` (PEFT's ``is_trainable``). ValueError when it was made for another geometry."""
    from safetensors.torch import load_file

    path = os.path.join(directory, PEFT_CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {PEFT_CONFIG_NAME} in {directory}")
    saved = read_json(path)
    # PEFT saves a projected prefix as its output: it comes back as a plain prefix
    config = dataclasses.replace(PrefixTuningConfig.from_dict(saved), prefix_projection=False)
    g = geometry(unwrap(model))
    if saved["num_layers"] != g.num_layers or saved["token_dim"] != g.token_dim:
        raise ValueError(
            f"the saved prefix is for {saved['num_layers']} layers x token_dim {saved['token_dim']}, the model has "
            f"{g.num_layers} layers x token_dim {g.token_dim} (= {g.num_heads} key/value heads x {g.head_dim})"
        )
    prompt = load_file(os.path.join(directory, PEFT_WEIGHTS_NAME))["prompt_embeddings"]
    handle = apply(model, config, fused=fused)
    weight = handle.encoder.embedding.weight
    if prompt.shape != weight.shape:
        handle.remove()
        raise ValueError(f"prompt_embeddings has shape {tuple(prompt.shape)}, expected {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(prompt)
    handle.set_trainable(trainable)
    return handle
