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

Files: :func:`save_prefix_tuning` writes PEFT's adapter format (``adapter_config.json`` +
``adapter_model.safetensors`` holding ``prompt_embeddings``, the flattened prefix), which
``PeftModel.from_pretrained`` loads; :func:`load_prefix_tuning` reads it (also what PEFT's
``save_pretrained`` wrote). As in PEFT, a projected prefix is saved as its output, so it comes back as
a plain (non-projected) prefix.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_CHILD = "fastft_prefix_encoder"
_STATE = "_fastft_prefix"


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


class _State:
    def __init__(self, geometry, encoder, handle, requires_grad):
        self.geometry = geometry
        self.encoder = encoder
        self.handle = handle
        self.requires_grad = requires_grad


def _prefix_cache(model: nn.Module, state: _State, batch_size: int, cache=None):
    """A DynamicCache holding the prefix for every layer (or ``cache``, an empty one, filled with it)."""
    from transformers import DynamicCache

    g = state.geometry
    enc = state.encoder
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


def _pre_hook(model: nn.Module):
    signature = inspect.signature(model.forward)

    def hook(module, args, kwargs):
        state = getattr(module, _STATE)
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
        t = state.encoder.num_virtual_tokens
        past = kw.get("past_key_values")
        fresh = past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0)
        if not fresh:
            # Generation after the first step: the prefix is already in the cache; only the mask needs it.
            mask = kw.get("attention_mask")
            if mask is not None and mask.dim() == 2 and mask.shape[1] == past.get_seq_length() - t + ref.shape[1]:
                kw["attention_mask"] = torch.cat([mask.new_ones(batch, t), mask], dim=1)
            return (), kw
        kw["past_key_values"] = _prefix_cache(module, state, batch, past)
        mask = kw.get("attention_mask")
        if mask is not None:
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, t), mask], dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + t
        return (), kw

    return hook


def has_prefix_tuning(model: nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


def apply_prefix_tuning(
    model: nn.Module,
    num_virtual_tokens: int = 20,
    prefix_projection: bool = False,
    encoder_hidden_size: Optional[int] = None,
    *,
    freeze_base: bool = True,
) -> PrefixEncoder:
    """Add trainable key/value prefixes to a Hugging Face causal LM (in place) and freeze its other
    parameters. Returns the :class:`PrefixEncoder` (also ``model.fastft_prefix_encoder``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
    if encoder_hidden_size is not None and (not isinstance(encoder_hidden_size, int) or encoder_hidden_size <= 0):
        raise ValueError(f"encoder_hidden_size must be a positive int or None, got {encoder_hidden_size!r}")
    if has_prefix_tuning(model):
        raise ValueError("the model already has a fastft prefix; call remove_prefix_tuning(model) first")
    g = geometry(model)
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else None
    encoder = PrefixEncoder(num_virtual_tokens, g.token_dim, g.num_layers, prefix_projection, encoder_hidden_size,
                            device=device)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    model.add_module(_CHILD, encoder)
    handle = model.register_forward_pre_hook(_pre_hook(model), with_kwargs=True)
    setattr(model, _STATE, _State(g, encoder, handle, requires_grad))
    return encoder


def remove_prefix_tuning(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_prefix_tuning`: the model is exactly as before."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no fastft prefix (apply_prefix_tuning was not called)")
    state.handle.remove()
    delattr(model, _CHILD)
    for n, p in model.named_parameters():
        if n in state.requires_grad:
            p.requires_grad_(state.requires_grad[n])
    delattr(model, _STATE)
    return model


def _peft_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return None


def save_prefix_tuning(model: nn.Module, directory: str, *, encoder: Optional[PrefixEncoder] = None) -> None:
    """Write the prefix in PEFT's adapter format (``PeftModel.from_pretrained(model, directory)`` loads it).
    ``encoder``: a copy of the model's encoder with full parameters, when the model's own are sharded."""
    from safetensors.torch import save_file

    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no fastft prefix to save")
    enc, g = encoder if encoder is not None else state.encoder, state.geometry
    os.makedirs(directory, exist_ok=True)
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "encoder_hidden_size": enc.encoder_hidden_size,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": g.num_heads,
        "num_layers": g.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": enc.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": enc.prefix_projection,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": g.token_dim,
    }
    version = _peft_version()
    if version:
        config["peft_version"] = version
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with torch.no_grad():
        prompt = enc().detach().float().cpu().contiguous()
    save_file({"prompt_embeddings": prompt}, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def load_prefix_tuning(model: nn.Module, directory: str, *, is_trainable: bool = False) -> PrefixEncoder:
    """Apply the prefix saved in PEFT's format (by :func:`save_prefix_tuning` or PEFT's ``save_pretrained``).
    Frozen unless ``is_trainable`` (PEFT's default too). ValueError when it was made for another geometry."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter, not PREFIX_TUNING")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError("only decoder-only prefixes (num_transformer_submodules=1) are supported")
    g = geometry(model)
    if config["num_layers"] != g.num_layers or config["token_dim"] != g.token_dim:
        raise ValueError(
            f"the saved prefix is for {config['num_layers']} layers x token_dim {config['token_dim']}, the model has "
            f"{g.num_layers} layers x token_dim {g.token_dim} (= {g.num_heads} key/value heads x {g.head_dim})"
        )
    prompt = load_file(os.path.join(directory, WEIGHTS_NAME))["prompt_embeddings"]
    encoder = apply_prefix_tuning(model, config["num_virtual_tokens"], prefix_projection=False)
    if prompt.shape != encoder.embedding.weight.shape:
        remove_prefix_tuning(model)
        raise ValueError(f"prompt_embeddings has shape {tuple(prompt.shape)}, expected {tuple(encoder.embedding.weight.shape)}")
    with torch.no_grad():
        encoder.embedding.weight.copy_(prompt)
    encoder.requires_grad_(is_trainable)
    return encoder
