"""Model builders, and preparing a model for training.

A builder takes the Config and returns ``(model, tokenizer)`` on the CPU in fp32 (or ``model.dtype``)
before any method, kernel patch or sharding. ``register_model(name)`` adds one; the run picks it by
``model.builder``. ``prepare_model`` then applies the enabled methods through ``fastft.tuners`` (each
fastft's or stock, as the kernel stack ``cfg.kernels.stack`` says), the fused layers and the fused loss head.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..tuners.base import unwrap
from .config import METHOD_SECTIONS, ConfigError

BUILDERS: dict[str, Callable] = {}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags of native bf16 arithmetic; without them torch emulates bf16 GEMMs (4x slower than fp32 on an
# AVX2-only EPYC, measured 2026-12-07: 512x576x1536, 183 vs 44 ms)
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def auto_base_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """``model.dtype = "auto"``: bf16 for the frozen base where the hardware computes bf16 natively, else fp32;
    with the reason (printed by the run)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return torch.float32, f"{torch.cuda.get_device_name(device)} has no native bf16"
    native = sorted(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS))
    if native:
        return torch.bfloat16, f"this CPU computes bf16 natively ({', '.join(native)})"
    return torch.float32, ("this CPU has no native bf16 (no avx512_bf16 / amx_bf16): bf16 GEMMs would be emulated, "
                           "several times slower than fp32")


def base_dtype(cfg, announce: bool = False) -> torch.dtype:
    """The frozen base's dtype of ``model.dtype``; "auto" is resolved and its choice printed on rank 0.
    ``announce``: a set dtype is printed too, with what "auto" would pick here (the demo shows both)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if cfg.model.dtype != "auto":
        if announce and _is_rank0():
            auto, why = auto_base_dtype(device)
            print(f"model.dtype = {cfg.model.dtype} (set by the config; auto would pick "
                  f"{str(auto).removeprefix('torch.')} here: {why})", flush=True)
        return _DTYPES[cfg.model.dtype]
    dtype, why = auto_base_dtype(device)
    if _is_rank0():
        print(f"model.dtype = auto: {str(dtype).removeprefix('torch.')} ({why}); "
              f"--model.dtype=float32 or bfloat16 to choose", flush=True)
    return dtype


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
    dtype = base_dtype(cfg, announce=True)  # a pretrained model: say which dtype its weights get, and why
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
    if m.gguf_file:  # converted now or read from the cache (an older cache kept the GGUF config)
        drop_gguf_quantization(model)
    if kwargs and cache is not None and _is_rank0():
        tmp = cache.with_name(cache.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache) if not cache.exists() else None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def drop_gguf_quantization(model: nn.Module) -> None:
    """A GGUF model is dequantized on load, yet transformers keeps its GGUF quantizer and
    ``config.quantization_config``: its Trainer then refuses the model and a saved copy is not a plain
    trainable folder. The weights are plain tensors, so both are dropped."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property derived from hf_quantizer
            pass


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
        model = LlamaForCausalLM(config).to(base_dtype(cfg))
    return model, tokenizer


def prepare_model(model: nn.Module, cfg) -> nn.Module:
    """The parameter-efficient methods the config enables (``[lora]``, ``[prefix]``, ``[bottleneck]``, each
    applied by ``fastft.tuners.apply`` with ``fused`` from the kernel stack), then the fused layers and
    the fused loss head. With any method on, exactly the parameters the methods added train (the tuners'
    freeze rule), and those of the submodules the model lists in ``train_with_methods`` (e.g. new task
    heads); with none, the whole model does (full fine-tuning). Returns the model to train."""
    from ..tuners import apply

    stack = cfg.kernels.stack
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads model.is_gradient_checkpointing, deprecated in transformers 5.x (works until v6)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        for offset, name in enumerate(METHOD_SECTIONS, start=1):
            section = getattr(cfg, name)
            if not section.enabled:
                continue
            torch.manual_seed(cfg.run.seed + offset)  # the same initial weights on every rank and in every mode
            try:
                model = apply(model, section.to_config(), fused=getattr(stack, name)).model
            except ValueError as exc:  # e.g. "target module 'x' matches no module" (fastft's or PEFT's)
                raise ConfigError(f"{_section_text(name, section)}: {exc}") from exc
    for p in _trained_with_methods(model):
        p.requires_grad_(True)
    layers = {(True, True): True, (True, False): "norms", (False, True): "mlp"}.get((stack.norms, stack.mlp))
    if layers:
        from fastft.integrations.patch import patch

        patch(model, loss=False, lora=False, layers=layers, check="never")
    if stack.loss and _is_causal_lm(model):
        from fastft.integrations.causal_lm_loss import patch_causal_lm_loss

        patch_causal_lm_loss(model)
    return model


def _section_text(name: str, section) -> str:
    """``lora.r = 16, lora.lora_alpha = 32.0, ...``: the keys a method was applied with."""
    return ", ".join(f"{name}.{f.name} = {getattr(section, f.name)!r}" for f in dataclasses.fields(section)
                     if f.name != "enabled")


def _trained_with_methods(model: nn.Module) -> list:
    """Parameters of the submodules a model names in ``train_with_methods`` (e.g. a recipe's new task
    heads), which train along with the methods, as PEFT's ``modules_to_save``; none without a method."""
    from ..tuners import handles

    base = unwrap(model)
    if not handles(base):
        return []
    return [p for name in getattr(base, "train_with_methods", ()) for p in base.get_submodule(name).parameters()]


def _is_causal_lm(model: nn.Module) -> bool:
    """A model whose loss is next-token cross-entropy over an lm_head (what the fused head replaces)."""
    base = unwrap(model)
    return hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None and \
        type(base).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def transformer_blocks(model: nn.Module) -> list:
    """The decoder blocks: modules whose class the model lists in ``_no_split_modules`` (transformers),
    else the children of the largest nn.ModuleList."""
    base = unwrap(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(base).__name__}")
    return list(max(lists, key=len))


def export_methods(model: nn.Module, output: Path, is_rank0: bool) -> list[str]:
    """Each method's trained parameters in its own folder of ``output``, named after the method (``lora``
    and ``prefix`` in PEFT's format, ``bottleneck`` in fastft's): ``handle.save``. Every rank must call this
    (sharded parameters are gathered); rank 0 writes. Returns the folders written."""
    from ..tuners import handles

    written = []
    for method, handle in handles(model).items():
        handle.save(str(output / method), is_main_process=is_rank0)
        written.append(str(output / method))
    return written
