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
        if os.path.sep in folder or folder.startswith(".") or Path(folder).is_dir():
            if not Path(folder).is_dir():
                raise ModelLoadError(f"model folder {folder!r} does not exist")
            if not (Path(folder) / "config.json").is_file():
                ggufs = sorted(p.name for p in Path(folder).glob("*.gguf"))
                hint = f"; it holds {', '.join(ggufs)}: set model.gguf_file" if ggufs else ""
                raise ModelLoadError(f"model folder {folder!r} has no config.json (not a Hugging Face model folder){hint}")
        kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        # transformers reports a broken or partial model folder through any of these
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ModelLoadError(f"cannot load a model from {folder!r}: {type(exc).__name__}: {detail}") from exc
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


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (PeftModel.get_base_model()), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def kernel_switches(cfg) -> dict:
    k = cfg.kernels
    return {"fused_loss": k.enabled and k.fused_loss, "lora": k.enabled and k.lora,
            "fused_layers": k.enabled and k.fused_layers, "bottleneck": k.enabled and k.bottleneck,
            "prefix": k.enabled and k.prefix}


def prepare_model(model: nn.Module, cfg) -> nn.Module:
    """The parameter-efficient methods the config enables (LoRA, bottleneck adapters, prefix tuning;
    each fastft's or, with its kernel switch off, PEFT's / eager torch), then the fused layers and the
    fused loss head. With any method on, exactly the parameters the methods added train (and those of
    the submodules the model lists in ``train_with_methods``, e.g. new task heads); with none, the whole
    model does (full fine-tuning). Returns the model to train."""
    switches = kernel_switches(cfg)
    base = {id(p) for p in model.parameters()}
    methods = cfg.lora.enabled or cfg.bottleneck.enabled or cfg.prefix.enabled
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads model.is_gradient_checkpointing, deprecated in transformers 5.x (works until v6)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # the same initial adapters on every rank and in every mode: each method draws from its own seed
        if cfg.lora.enabled:
            torch.manual_seed(cfg.run.seed + 1)
            try:
                model = _apply_lora(model, cfg, fastft_layers=switches["lora"])
            except ValueError as exc:  # fastft's and PEFT's "matches no module" (ConfigError too)
                raise ConfigError(f"lora.target_modules = {cfg.lora.target_modules!r}: {exc}") from exc
        if cfg.prefix.enabled:
            torch.manual_seed(cfg.run.seed + 2)
            model = _apply_prefix(model, cfg, fastft_prefix=switches["prefix"])
        if cfg.bottleneck.enabled:
            torch.manual_seed(cfg.run.seed + 3)
            _apply_bottleneck(model, cfg, fused=switches["bottleneck"])
    if methods:  # each method freezes "the rest" when applied, which may include an earlier method's parameters
        also = _trained_with_methods(model)
        for p in model.parameters():
            p.requires_grad_(id(p) not in base or id(p) in also)
    if switches["fused_layers"]:
        from fastft.integrations.patch import patch

        patch(model, loss=False, lora=False, adapters=False, layers=True, check="never")
    if switches["fused_loss"] and _is_causal_lm(model):
        from fastft.integrations.causal_lm_loss import patch_causal_lm_loss

        patch_causal_lm_loss(model)
    return model


def _trained_with_methods(model: nn.Module) -> set:
    """Parameters of the submodules a model names in ``train_with_methods`` (e.g. a recipe's new task
    heads), which train along with the methods, as PEFT's ``modules_to_save``."""
    base = base_model(model)
    names = getattr(base, "train_with_methods", ())
    return {id(p) for name in names for p in base.get_submodule(name).parameters()}


def _is_causal_lm(model: nn.Module) -> bool:
    """A model whose loss is next-token cross-entropy over an lm_head (what the fused head replaces)."""
    base = base_model(model)
    return hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None and \
        type(base).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _apply_lora(model: nn.Module, cfg, fastft_layers: bool) -> nn.Module:
    target = cfg.lora.target_modules
    target = list(target) if isinstance(target, (list, tuple)) else target
    if fastft_layers:
        from fastft.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                     target_modules=target, task_type="CAUSAL_LM"))
        return model
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                      lora_dropout=cfg.lora.dropout, target_modules=target,
                                                      task_type="CAUSAL_LM"))


def _apply_prefix(model: nn.Module, cfg, fastft_prefix: bool) -> nn.Module:
    p = cfg.prefix
    hidden = p.encoder_hidden_size or None
    if fastft_prefix:
        from fastft.prefix import apply_prefix_tuning

        apply_prefix_tuning(model, p.num_virtual_tokens, prefix_projection=p.projection, encoder_hidden_size=hidden)
        return model
    import peft

    kwargs = {"encoder_hidden_size": hidden} if hidden else {}
    return peft.get_peft_model(model, peft.PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens,
                                                              prefix_projection=p.projection, task_type="CAUSAL_LM",
                                                              **kwargs))


def _apply_bottleneck(model: nn.Module, cfg, fused: bool) -> None:
    from fastft.bottleneck import apply_bottleneck_adapters, bottleneck_adapters

    b = cfg.bottleneck
    base = base_model(model)
    apply_bottleneck_adapters(base, b.adapter_size, b.placement, activation=b.activation, dropout=b.dropout,
                              scale=b.scale)
    for adapter in bottleneck_adapters(base):
        adapter.fused = fused


def transformer_blocks(model: nn.Module) -> list:
    """The decoder blocks: modules whose class the model lists in ``_no_split_modules`` (transformers),
    else the children of the largest nn.ModuleList."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(base).__name__}")
    return list(max(lists, key=len))


def _full_tensors(tensors: dict) -> dict:
    """Sharded (DTensor) tensors gathered, every tensor as a contiguous CPU copy; every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous().clone()
            for k, v in sorted(tensors.items())}


def export_adapters(model: nn.Module, output: Path, cfg, is_rank0: bool) -> list[str]:
    """Each enabled method's trained parameters, in its own folder of ``output``: ``adapter`` (LoRA, PEFT
    format), ``prefix`` (PEFT format) and ``bottleneck`` (fastft.bottleneck's format). Every rank must
    call this (sharded parameters are gathered). Returns the folders written."""
    written = []
    if cfg.lora.enabled:
        export_lora(model, str(output / "adapter"), is_rank0)
        written.append(str(output / "adapter"))
    if cfg.bottleneck.enabled:
        from fastft.bottleneck import bottleneck_state_dict, save_bottleneck_adapters

        base = base_model(model)
        tensors = _full_tensors(bottleneck_state_dict(base))
        if is_rank0:
            save_bottleneck_adapters(base, str(output / "bottleneck"), tensors=tensors)
        written.append(str(output / "bottleneck"))
    if cfg.prefix.enabled:
        _export_prefix(model, str(output / "prefix"), is_rank0)
        written.append(str(output / "prefix"))
    return written


def _export_prefix(model: nn.Module, directory: str, is_rank0: bool) -> None:
    from torch.distributed.tensor import DTensor

    if hasattr(model, "peft_config"):  # PEFT's prefix (kernels off): PEFT writes its own files
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise NotImplementedError("exporting PEFT's prefix from a sharded model: use kernels.prefix = true")
        if is_rank0:
            model.save_pretrained(directory)
        return
    from fastft.prefix import save_prefix_tuning

    encoder = model.get_submodule("fastft_prefix_encoder")
    if any(isinstance(p, DTensor) for p in encoder.parameters()):
        import copy

        full = copy.deepcopy(encoder)  # the encoder's own layout, with gathered (plain) parameters
        for name, value in _full_tensors(dict(encoder.named_parameters())).items():
            full.get_parameter(name).data = value
        encoder = full
    if is_rank0:
        save_prefix_tuning(model, directory, encoder=encoder)


def export_lora(model: nn.Module, directory: str, is_rank0: bool) -> None:
    """The LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors). Sharded
    (DTensor) parameters are gathered first, so every rank must call this."""
    import json

    from safetensors.torch import save_file

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
    full = _full_tensors(tensors)
    if not is_rank0:
        return
    os.makedirs(directory, exist_ok=True)
    save_file(full, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
