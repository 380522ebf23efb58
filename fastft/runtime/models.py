"""Model builders and the kernel switches.

A builder takes the Config and returns ``(model, tokenizer)`` on the CPU in fp32 (or ``model.dtype``)
before any adapter, kernel patch or sharding. ``register_model(name)`` adds one; the run picks it by
``model.builder``. ``prepare_model`` then applies LoRA (fastft's fused layers, or PEFT's when
``kernels.lora`` is off) and the fused loss head.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import ConfigError

BUILDERS: dict[str, Callable] = {}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be found or loaded (the message names the path)."""


def register_model(name: str):
    def add(builder):
        BUILDERS[name] = builder
        return builder
    return add


def build_model(cfg):
    if cfg.model.builder not in BUILDERS:
        raise ConfigError(f"model.builder {cfg.model.builder!r} is unknown; known: {', '.join(BUILDERS)}")
    return BUILDERS[cfg.model.builder](cfg)


def resolve_path(path: str) -> str:
    """A folder, a hub id, or "package:<name>": the folder of an installed Python package, found without
    importing it (a package may ship model files and an __init__ with heavy imports)."""
    if path.startswith("package:"):
        name = path.split(":", 1)[1]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"model.path {path!r}: Python package {name!r} is not installed")
        return os.path.dirname(spec.origin)
    return path


@register_model("hf")
def hf_model(cfg):
    """AutoModelForCausalLM / AutoTokenizer from a folder or hub id; a GGUF file is dequantized (and,
    with ``model.convert_cache``, kept as safetensors so later runs load fast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = cfg.model
    if not m.path:
        raise ConfigError("model.path must be set for model.builder = 'hf'")
    folder = resolve_path(m.path)
    dtype = _DTYPES[m.dtype]
    cache = Path(m.convert_cache) if m.convert_cache else None
    if m.gguf_file:
        gguf = Path(folder) / m.gguf_file
        if not gguf.is_file():
            raise ModelLoadError(f"model file {str(gguf)!r} does not exist (model.path + model.gguf_file)")
        if cache is not None and (cache / "config.json").is_file():
            folder, kwargs = str(cache), {}
        else:
            kwargs = {"gguf_file": m.gguf_file}
    else:
        if os.path.sep in folder or folder.startswith("."):
            if not Path(folder).is_dir():
                raise ModelLoadError(f"model folder {folder!r} does not exist")
        kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load a model from {folder!r}: {exc}") from None
    if kwargs and cache is not None and _is_rank0():
        tmp = cache.with_name(cache.name + ".tmp")
        # the weights are dequantized on load; drop the GGUF quantizer so transformers saves them plainly
        quantizer, model.hf_quantizer = getattr(model, "hf_quantizer", None), None
        model.save_pretrained(tmp)
        model.hf_quantizer = quantizer
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache) if not cache.exists() else None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a ChatML chat template: real
    tokenization and templating for config-built models, without any file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


@register_model("tiny_llama")
def tiny_llama(cfg):
    """A Llama built from the config's sizes (random init from run.seed) with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_heads, max_position_embeddings=4096,
                         attention_dropout=m.dropout, tie_word_embeddings=m.tie_embeddings,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = LlamaForCausalLM(config).to(_DTYPES[m.dtype])
    return model, tokenizer


def kernel_switches(cfg) -> dict:
    k = cfg.kernels
    return {"fused_loss": k.enabled and k.fused_loss, "lora": k.enabled and k.lora,
            "fused_layers": k.enabled and k.fused_layers}


def prepare_model(model: nn.Module, cfg) -> nn.Module:
    """LoRA (fastft's or PEFT's) and the fused loss head, per the config. Returns the model to train."""
    switches = kernel_switches(cfg)
    if cfg.lora.enabled:
        target = cfg.lora.target_modules
        target = list(target) if isinstance(target, (list, tuple)) else target
        if switches["lora"]:
            from fastft.lora import LoraConfig, apply_lora

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.run.seed + 1)  # same adapter init on every rank and in every mode
                apply_lora(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=target, task_type="CAUSAL_LM"))
        else:
            import peft

            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # peft 0.21 reads model.is_gradient_checkpointing, deprecated in transformers 5.x (works until v6)
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                torch.manual_seed(cfg.run.seed + 1)
                model = peft.get_peft_model(model, peft.LoraConfig(
                    r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=target,
                    task_type="CAUSAL_LM"))
    if switches["fused_layers"]:
        from fastft.integrations.patch import patch

        patch(model, loss=False, lora=False, adapters=False, layers=True, check="never")
    if switches["fused_loss"]:
        from fastft.integrations.transformers import patch_causal_lm_loss

        patch_causal_lm_loss(model)
    return model


def transformer_blocks(model: nn.Module) -> list:
    """The decoder blocks: modules whose class the model lists in ``_no_split_modules`` (transformers),
    else the children of the largest nn.ModuleList."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(base).__name__}")
    return list(max(lists, key=len))


def export_adapter(model: nn.Module, directory: str, is_rank0: bool) -> None:
    """The LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors). Sharded
    (DTensor) parameters are gathered first, so every rank must call this."""
    import json

    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    if hasattr(model, "peft_config"):  # PEFT model (kernels off): PEFT's own key names and config
        from peft.utils import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model, state_dict={
            k: v for k, v in model.state_dict().items() if "lora_" in k})
        config = model.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        config["peft_type"] = "LORA"
        config["task_type"] = "CAUSAL_LM"
        config["inference_mode"] = True
    else:
        from fastft.lora import adapter_state_dict, get_lora_config

        tensors = adapter_state_dict(model)
        config = get_lora_config(model).to_peft_dict()
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous().clone()
            for k, v in sorted(tensors.items())}
    if not is_rank0:
        return
    os.makedirs(directory, exist_ok=True)
    save_file(full, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
