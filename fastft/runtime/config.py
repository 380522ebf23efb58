"""Run configuration: nested frozen dataclasses, loaded from TOML, with dotted command-line overrides.

    cfg = load_config("recipes/instruction_tuning.toml", ["--optim.lr=3e-4", "--parallel.mode=fsdp2"])

Every section and key is declared below; an unknown one is a ``ConfigError`` naming it and the valid
ones. Values are type-checked (an int where a float is declared is accepted). Override values are
parsed as TOML values (``3e-4``, ``true``, ``[1, 2]``, ``"x"``); anything else is taken as a string,
and an empty value (``--data.generator=``) is the empty string, which unsets a key. Keys that exclude
each other (``EXCLUSIVE``) both set is a ``ConfigError`` naming both and where each was set.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, or an invalid value (the message names it)."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    log_every: int = 1
    progress: bool = True          # tqdm bar on rank 0
    plots: bool = True             # PNG curves at the end
    export_adapter: bool = True    # at the end, each method's parameters: <output_dir>/adapter (LoRA), prefix, bottleneck
    resume: bool = True            # continue from the newest complete checkpoint in <output_dir>/checkpoints
    overwrite: bool = False        # start over in a folder that holds checkpoints (they are deleted when the run starts)


@dataclass(frozen=True)
class ModelConfig:
    # "hf": AutoModelForCausalLM.from_pretrained(path[, gguf_file]); "tiny_llama": a config-built Llama
    # with a byte-level chat tokenizer (tests, smoke runs). More builders: fastft.runtime.models.register_model.
    builder: str = "hf"
    path: str = ""                 # a folder, a hub id, or "package:<name>" (the folder of an installed package)
    gguf_file: str = ""            # a GGUF file inside `path` (dequantized on load)
    convert_cache: str = ""        # folder to keep the GGUF converted to safetensors (fast reloads)
    dtype: str = "float32"         # dtype of the frozen base weights
    # tiny_llama only
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    dropout: float = 0.0           # attention dropout (tests of RNG restore)
    tie_embeddings: bool = False


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = True
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"   # PEFT's rules: a list of names, a regex, or "all-linear"


@dataclass(frozen=True)
class BottleneckSection:
    # bottleneck adapters (fastft.bottleneck) after the attention and/or MLP output of every block
    enabled: bool = False
    adapter_size: int = 64
    placement: str = "houlsby"     # houlsby (attention and MLP) | pfeiffer (MLP only)
    activation: str = "relu"       # relu | gelu | gelu_tanh | silu
    dropout: float = 0.1
    scale: float = 1.0


@dataclass(frozen=True)
class PrefixSection:
    # prefix tuning (fastft.prefix, PEFT-compatible): trainable key/value prefixes in every layer
    enabled: bool = False
    num_virtual_tokens: int = 20
    projection: bool = False       # a two-layer tanh MLP produces the prefix (PEFT's prefix_projection)
    encoder_hidden_size: int = 0   # that MLP's width (0: the key/value width)


@dataclass(frozen=True)
class DataConfig:
    task: str = "causal_lm"        # fastft.runtime.tasks registry: data + loss + eval metric
    path: str = ""                 # JSONL: {"instruction", "input"?, "output"} or {"messages": [...]}
    eval_path: str = ""
    generator: str = ""            # or generated data (fastft.runtime.data.GENERATORS), e.g. "addition"
    num_train: int = 2000
    num_eval: int = 100
    max_length: int = 256
    packing: bool = False


@dataclass(frozen=True)
class BatchConfig:
    micro_batch_size: int = 4      # sequences per rank per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0         # 0: off
    schedule: str = "cosine"       # cosine | wsd | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2    # wsd: the last fraction of steps decays linearly
    min_lr_ratio: float = 0.0
    fused: str = "auto"            # auto | true | false


@dataclass(frozen=True)
class ParallelConfig:
    mode: str = "ddp"              # ddp | zero1 | zero2 | fsdp2 | hsdp (one process: plain)
    nproc: int = 1                 # > 1: relaunch through torch.distributed.run
    hsdp_replicate: int = 0        # hsdp: replica groups (0: 2 when the world size is even, else 1)


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: str = "fp32"            # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    impl: str = "autocast"         # autocast | fsdp (MixedPrecisionPolicy; zero2/fsdp2/hsdp only)


@dataclass(frozen=True)
class MemoryConfig:
    activation_checkpointing: str = "none"   # none | full | every_k | offload
    every_k: int = 2


@dataclass(frozen=True)
class KernelsConfig:
    enabled: bool = True           # false: every switch below off (stock transformers + PEFT)
    fused_loss: bool = True        # fastft.integrations.causal_lm_loss.patch_causal_lm_loss
    lora: bool = True              # fastft.lora (fused LoRA layers) instead of PEFT's
    fused_layers: bool = True      # fused RMSNorm / SwiGLU MLP (fastft.patch(layers=True)) where the architecture has them
    bottleneck: bool = True        # bottleneck adapters through fastft's fused op (off: the same block in eager torch)
    prefix: bool = True            # fastft.prefix (off: PEFT's prefix tuning)


@dataclass(frozen=True)
class CompileConfig:
    # torch.compile of each decoder block (regional compilation, as torchtitan does), after activation
    # checkpointing and before DDP / FSDP2; fastft's ops are registered custom ops that compile whole
    enabled: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0                 # steps between saves (0: only at the end)
    at_end: bool = True
    keep: int = 2                  # completed checkpoints kept


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0                 # steps between evals (0: none in between)
    at_start: bool = False
    at_end: bool = True
    metric: str = "loss"           # the metric early stopping and the curves follow
    generate: bool = False         # exact-match accuracy of greedy answers (instruction data)
    max_new_tokens: int = 8
    batch_size: int = 16
    early_stopping_patience: int = 0   # evals without improvement before stopping (0: off)


@dataclass(frozen=True)
class RecipeConfig:
    # a module imported before the run is built: it registers the recipe's task, model builder and
    # callbacks (e.g. "fastft.recipes.text_classification"); docs/recipes.md lists them
    module: str = ""
    options: Any = field(default_factory=dict)   # free-form table the recipe validates ([recipe.options])


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    bottleneck: BottleneckSection = field(default_factory=BottleneckSection)
    prefix: PrefixSection = field(default_factory=PrefixSection)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "optim.schedule": ("cosine", "wsd", "constant"),
    "optim.fused": ("auto", "true", "false"),
    "parallel.mode": ("ddp", "zero1", "zero2", "fsdp2", "hsdp"),
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "precision.impl": ("autocast", "fsdp"),
    "memory.activation_checkpointing": ("none", "full", "every_k", "offload"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "bottleneck.placement": ("houlsby", "pfeiffer"),
    "bottleneck.activation": ("relu", "gelu", "gelu_tanh", "silu"),   # fastft.ops.adapter.ACTIVATIONS
}
POSITIVE = ("run.max_steps", "run.log_every", "batch.micro_batch_size", "batch.grad_accum", "parallel.nproc",
            "data.max_length", "memory.every_k", "lora.r", "eval.max_new_tokens", "eval.batch_size", "checkpoint.keep",
            "bottleneck.adapter_size", "prefix.num_virtual_tokens")


def _section_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(key: str, value, expected):
    if expected is Any:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if expected in (float, str) and not isinstance(value, expected):
        raise ConfigError(f"{key} must be a {expected.__name__}, got {value!r}")
    return value


# keys of which at most one may be set (non-empty): the first would be silently ignored otherwise
EXCLUSIVE = (("data.path", "data.generator"),       # a generator makes the training data
             ("data.eval_path", "data.generator"))  # ... and its held-out eval data


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_exclusive(cfg: Config, sources: dict) -> None:
    """Two keys that exclude each other both set (a command-line value of one does not unset the TOML
    value of the other: an empty value does, ``--data.generator=``) is an error naming both."""
    def where(key):
        return f" ({sources[key]})" if key in sources else ""

    for first, second in EXCLUSIVE:
        if _value(cfg, first) and _value(cfg, second):
            # unset the one the command line did not give
            clear = first if sources.get(second) == "command line" and sources.get(first) != "command line" else second
            raise ConfigError(f"{first} = {_value(cfg, first)!r}{where(first)} and {second} = {_value(cfg, second)!r}"
                              f"{where(second)} exclude each other: unset one, e.g. --{clear}= (an empty value unsets a key)")
    if cfg.model.builder == "tiny_llama":
        for key in ("model.path", "model.gguf_file"):
            if _value(cfg, key):
                raise ConfigError(f"{key} = {_value(cfg, key)!r}{where(key)} is not used by model.builder = 'tiny_llama' "
                                  f"(a config-built model): unset it (--{key}=) or set --model.builder=hf")


def _build(raw: dict, sources: Optional[dict] = None) -> Config:
    sections = _section_types(Config)
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}; valid sections: {', '.join(sections)}")
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a table of keys, got {value!r}")
        keys = _section_types(sections[name])
        for key in value:
            if key not in keys:
                raise ConfigError(f"unknown config key {name}.{key}; valid keys of [{name}]: {', '.join(keys)}")
        built[name] = sections[name](**{k: _check_type(f"{name}.{k}", v, keys[k]) for k, v in value.items()})
    cfg = Config(**built)
    _validate(cfg)
    _check_exclusive(cfg, sources or {})
    return cfg


def _validate(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(getattr(cfg, section), name)!r}")
    if cfg.precision.impl == "fsdp" and cfg.parallel.mode not in ("zero2", "fsdp2", "hsdp"):
        raise ConfigError(f"precision.impl = 'fsdp' needs parallel.mode zero2, fsdp2 or hsdp, got {cfg.parallel.mode!r}")
    if not 0.0 <= cfg.bottleneck.dropout < 1.0:
        raise ConfigError(f"bottleneck.dropout must be in [0, 1), got {cfg.bottleneck.dropout!r}")
    if cfg.prefix.encoder_hidden_size < 0:
        raise ConfigError(f"prefix.encoder_hidden_size must be >= 0, got {cfg.prefix.encoder_hidden_size!r}")
    peft_methods = [name for name, on, fastft_kernel in (("lora", cfg.lora.enabled, cfg.kernels.lora),
                                                          ("prefix", cfg.prefix.enabled, cfg.kernels.prefix))
                    if on and not (cfg.kernels.enabled and fastft_kernel)]
    if len(peft_methods) > 1:
        raise ConfigError("lora and prefix are both enabled with fastft's versions off (kernels.enabled / kernels.lora / "
                          "kernels.prefix), but PEFT applies one method per model: turn one of them on in fastft")
    if cfg.prefix.enabled and cfg.data.packing:
        raise ConfigError("prefix.enabled with data.packing: a packed row holds several sequences, and the prefix "
                          "(a key/value cache in front of the row) would be shared by all of them; set data.packing = false")
    if not cfg.data.path and not cfg.data.generator:
        raise ConfigError("data.path (a JSONL file) or data.generator must be set")


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``--a.b=value`` -> (["a", "b"], parsed value); ``--a.b.c=value`` sets key c of the table a.b."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    dotted, _, text = arg[2:].partition("=")
    path = dotted.split(".")
    if len(path) == 3 and path[:2] == ["recipe", "options"] and path[2]:  # --recipe.options.key=value
        return path, _parse_value(text)
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {arg!r}: the key must be section.key, got {dotted!r}")
    return path, _parse_value(text)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: Optional[str | Path] = None, overrides: list[str] = ()) -> Config:
    """The Config of a TOML file (or the defaults) with ``--section.key=value`` overrides applied."""
    raw: dict = {}
    sources: dict = {}  # "section.key" -> where its value came from (for conflict messages)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        sources = {f"{section}.{key}": str(path) for section, table in raw.items() if isinstance(table, dict)
                   for key in table}
    for arg in overrides:
        (section, key, *option), value = parse_override(arg)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a table")
        if option:  # recipe.options.<name>
            raw[section].setdefault(key, {})[option[0]] = value
        else:
            raw[section][key] = value
            sources[f"{section}.{key}"] = "command line"
    return _build(raw, sources)


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with some keys changed: ``replace(cfg, optim={"lr": 1e-4})`` (validated)."""
    raw = cfg.to_dict()
    for section, values in sections.items():
        if section not in raw:
            raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(raw)}")
        raw[section].update(values)
    return _build(raw)
