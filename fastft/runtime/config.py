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
    """Where the run writes, how long it runs, and what it does with an earlier run's checkpoints."""

    output_dir: str = "runs/default"
    """metrics.jsonl, summary.json, curves.png, checkpoints/ and one folder per method (lora/, prefix/, bottleneck/)"""
    seed: int = 0
    """Model init (config-built models), adapter init and data order"""
    max_steps: int = 100
    """Optimizer steps"""
    log_every: int = 1
    """Steps between metrics.jsonl lines"""
    progress: bool = True
    """A tqdm bar on rank 0"""
    plots: bool = True
    """PNG curves of the metrics at the end"""
    export_methods: bool = True
    """At the end, each method's trained parameters in its own folder of output_dir (PEFT's format for LoRA and
    prefix), gathered under sharding"""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir/checkpoints; false in a folder that holds
    checkpoints is an error naming the two ways out"""
    tracker: str = "none"
    """An experiment tracker beside metrics.jsonl: tensorboard writes local event files to output_dir/tensorboard"""
    overwrite: bool = False
    """Start over in a folder that holds checkpoints: they are deleted when the run starts (wins over run.resume)"""


@dataclass(frozen=True)
class ModelConfig:
    """The base model. More builders: fastft.runtime.models.register_model."""

    builder: str = "hf"
    """hf: AutoModelForCausalLM.from_pretrained(path[, gguf_file]); tiny_llama: a config-built Llama with a
    byte-level chat tokenizer (tests, smoke runs)"""
    path: str = ""
    """A folder, a hub id, or "package:<name>" (the folder of an installed package)"""
    gguf_file: str = ""
    """A GGUF file inside path (dequantized on load)"""
    convert_cache: str = ""
    """A folder where the dequantized GGUF model is kept as safetensors (later loads are fast)"""
    dtype: str = "float32"
    """Dtype of the frozen base weights; auto: bfloat16 where the device computes bf16 natively (a GPU with bf16,
    a CPU with avx512_bf16 / amx_bf16), else float32, the choice printed at the start"""
    hidden_size: int = 64
    """tiny_llama: hidden size"""
    num_layers: int = 2
    """tiny_llama: decoder blocks"""
    num_heads: int = 4
    """tiny_llama: attention heads"""
    intermediate_size: int = 128
    """tiny_llama: MLP width"""
    dropout: float = 0.0
    """tiny_llama: attention dropout (tests of the RNG restore)"""
    tie_embeddings: bool = False
    """tiny_llama: the output layer shares the embedding's weight"""


# The method sections: the fields of fastft.tuners' configs, by the same names (PEFT's, where PEFT has the
# method), plus `enabled`; `to_config()` builds the tuner's config. TOML has no None: 0 stands for it.


@dataclass(frozen=True)
class LoraSection:
    """LoRA (fastft.tuners.LoraConfig, PEFT's field names)."""

    enabled: bool = True
    """Apply LoRA"""
    r: int = 16
    """Rank of the adapter"""
    lora_alpha: float = 32.0
    """Scale numerator: the update is (lora_alpha / r) B A x"""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input"""
    target_modules: Any = "all-linear"
    """PEFT's rules: a list of module names, a regex, or all-linear (every Linear but the output layer)"""

    def to_config(self):
        from ..tuners import LoraConfig

        target = list(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else self.target_modules
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, target_modules=target,
                          task_type="CAUSAL_LM")


@dataclass(frozen=True)
class BottleneckSection:
    """Bottleneck adapters (fastft.tuners.BottleneckConfig) after the attention and/or MLP output of every block."""

    enabled: bool = False
    """Apply bottleneck adapters"""
    adapter_size: int = 64
    """Width of the bottleneck"""
    placement: str = "houlsby"
    """houlsby: after attention and MLP; pfeiffer: after the MLP only"""
    activation: str = "relu"
    """The bottleneck's activation"""
    dropout: float = 0.1
    """Dropout inside the adapter, in [0, 1)"""
    scale: float = 1.0
    """Multiplier of the adapter's output added to the residual"""

    def to_config(self):
        from ..tuners import BottleneckConfig

        return BottleneckConfig(self.adapter_size, self.placement, self.activation, self.dropout, self.scale)


@dataclass(frozen=True)
class PrefixSection:
    """Prefix tuning (fastft.tuners.PrefixTuningConfig, PEFT's field names): trainable key/value prefixes in every
    layer."""

    enabled: bool = False
    """Apply prefix tuning"""
    num_virtual_tokens: int = 20
    """Prefix length per layer"""
    prefix_projection: bool = False
    """A two-layer tanh MLP produces the prefix (PEFT's reparametrization)"""
    encoder_hidden_size: int = 0
    """That MLP's width (0: the key/value width)"""

    def to_config(self):
        from ..tuners import PrefixTuningConfig

        return PrefixTuningConfig(self.num_virtual_tokens, self.prefix_projection, self.encoder_hidden_size or None)


# the method sections, in the order prepare_model applies them (each draws its initial weights from its own seed)
METHOD_SECTIONS = ("lora", "prefix", "bottleneck")


@dataclass(frozen=True)
class DataConfig:
    """Training and held-out data: a JSONL file or a generator, tokenized with the model's chat template."""

    task: str = "causal_lm"
    """The task (fastft.runtime.tasks registry): data, loss and eval metric"""
    path: str = ""
    """Training JSONL: {"instruction", "input"?, "output"} or {"messages": [...]} per line"""
    eval_path: str = ""
    """Held-out JSONL, same format"""
    generator: str = ""
    """Generated data instead of path (fastft.runtime.data.register_generator), e.g. addition ('Compute a + b')"""
    num_train: int = 2000
    """Examples the generator makes for training"""
    num_eval: int = 100
    """Examples the generator makes for eval"""
    max_length: int = 256
    """Tokens per example (truncated) or per pack"""
    packing: bool = False
    """Greedy packing of examples into rows; position ids restart per example"""


@dataclass(frozen=True)
class BatchConfig:
    """The global batch is micro_batch_size x grad_accum x world size."""

    micro_batch_size: int = 4
    """Sequences per rank per micro-batch"""
    grad_accum: int = 1
    """Micro-batches per optimizer step"""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay"""
    beta1: float = 0.9
    """AdamW's first-moment decay"""
    beta2: float = 0.999
    """AdamW's second-moment decay"""
    eps: float = 1e-8
    """AdamW's denominator epsilon"""
    grad_clip: float = 1.0
    """Global-norm gradient clipping (0: off; the norm is logged either way)"""
    schedule: str = "cosine"
    """cosine; wsd: warm-up, stable, then linear decay over decay_fraction; constant"""
    warmup_steps: int = 0
    """Linear warm-up steps"""
    decay_fraction: float = 0.2
    """wsd: the last fraction of steps decays linearly"""
    min_lr_ratio: float = 0.0
    """The schedule's floor, as a fraction of lr"""
    fused: str = "auto"
    """Fused AdamW: auto (where the device supports it, else foreach), true or false"""


@dataclass(frozen=True)
class ParallelConfig:
    """Data parallelism on torch.distributed (one process: plain). Modes: ddp (DistributedDataParallel, nothing
    sharded); zero1 (DDP + ZeroRedundancyOptimizer: optimizer state sharded); zero2 (FSDP2 fully_shard without
    resharding after forward: gradients and optimizer state sharded); fsdp2 (parameters, gradients and optimizer
    state sharded); hsdp (FSDP2 on a (replicate, shard) mesh)."""

    mode: str = "ddp"
    """How the ranks share the work (see the section's text)"""
    nproc: int = 1
    """Processes on this node (> 1: relaunch through torch.distributed.run); the same as --nproc"""
    hsdp_replicate: int = 0
    """hsdp: replica groups (0: 2 when the world size is even, else 1)"""


@dataclass(frozen=True)
class PrecisionConfig:
    """Mixed precision of the trained step."""

    dtype: str = "fp32"
    """Compute dtype (fp16 uses a GradScaler)"""
    impl: str = "autocast"
    """autocast, or fsdp: FSDP2's MixedPrecisionPolicy (low-precision parameters, fp32 reduce; zero2/fsdp2/hsdp)"""


@dataclass(frozen=True)
class MemoryConfig:
    """Activation memory."""

    activation_checkpointing: str = "none"
    """Recompute the activations of every decoder block (full), of every every_k-th block, or offload them to
    the host"""
    every_k: int = 2
    """every_k: checkpoint one block in every_k"""


@dataclass(frozen=True)
class KernelStack:
    """Which parts run fastft's kernels (True) or the stock implementation (False), resolved once from
    ``[kernels]`` (``cfg.kernels.stack``); the runtime and the recipes read this, nothing else."""

    loss: bool = True        # fused linear cross-entropy head (off: the model's own loss); recipes' losses too
    lora: bool = True        # fastft's fused LoRA layers (off: PEFT's)
    bottleneck: bool = True  # fastft's fused adapter op (off: the same block in eager torch)
    prefix: bool = True      # fastft's prefix tuning (off: PEFT's)
    norms: bool = True       # fused RMSNorm where the architecture has it (fastft.patch(layers="norms"))
    mlp: bool = True         # fused SwiGLU MLP where the architecture has it (fastft.patch(layers="mlp"))

    @classmethod
    def stock(cls) -> "KernelStack":
        return cls(**{f.name: False for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class KernelsConfig:
    """fastft's kernels or the stock implementation, per part; resolved once into ``cfg.kernels.stack``
    (KernelStack), which the runtime and the recipes read. All off is the built-in stock comparison."""

    enabled: bool = True
    """false: every part below stock (transformers + PEFT + torch), whatever its own switch says"""
    loss: bool = True
    """The fused linear cross-entropy head (causal LMs) and the recipes' losses (fastft.ops; off: torch's)"""
    lora: bool = True
    """fastft's fused LoRA layers (off: PEFT's)"""
    bottleneck: bool = True
    """fastft's fused adapter op (off: the same block in eager torch)"""
    prefix: bool = True
    """fastft's prefix tuning (off: PEFT's)"""
    norms: bool = True
    """Fused RMSNorm where the architecture has it"""
    mlp: bool = True
    """Fused SwiGLU MLP where the architecture has it"""

    @property
    def stack(self) -> KernelStack:
        if not self.enabled:
            return KernelStack.stock()
        return KernelStack(**{f.name: getattr(self, f.name) for f in dataclasses.fields(KernelStack)})


@dataclass(frozen=True)
class CompileConfig:
    """torch.compile of each decoder block (regional compilation, as torchtitan does), after activation
    checkpointing and before DDP / FSDP2; fastft's ops are registered custom ops that compile whole."""

    enabled: bool = False
    """Compile each decoder block (checked equal to eager, FSDP2 included)"""


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (torch.distributed.checkpoint) of the trainable state, in output_dir/checkpoints."""

    every: int = 0
    """Steps between saves (0: only at the end)"""
    at_end: bool = True
    """Save after the last step"""
    keep: int = 2
    """Completed checkpoints kept (older ones are pruned after a save succeeds)"""


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation and early stopping."""

    every: int = 0
    """Steps between evals (0: none in between)"""
    at_start: bool = False
    """Evaluate before the first step"""
    at_end: bool = True
    """Evaluate after the last step"""
    metric: str = "loss"
    """The metric early stopping and the curves follow"""
    generate: bool = False
    """Exact-match accuracy of greedy answers (instruction data)"""
    max_new_tokens: int = 8
    """generate: tokens generated per answer"""
    batch_size: int = 16
    """Eval sequences per batch"""
    early_stopping_patience: int = 0
    """Evals without improvement before stopping, agreed across ranks (0: off)"""


@dataclass(frozen=True)
class RecipeConfig:
    """A recipe: a module imported before the run is built, which registers its task, model builder and
    callbacks; docs/recipes.md lists them."""

    module: str = ""
    """The recipe's module, e.g. fastft.recipes.text_classification"""
    options: Any = field(default_factory=dict)
    """The recipe's own keys ([recipe.options]), validated by the recipe"""


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
    "run.tracker": ("none", "tensorboard"),   # fastft.runtime.reporting.TRACKERS
    "optim.schedule": ("cosine", "wsd", "constant"),
    "optim.fused": ("auto", "true", "false"),
    "parallel.mode": ("ddp", "zero1", "zero2", "fsdp2", "hsdp"),
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "precision.impl": ("autocast", "fsdp"),
    "memory.activation_checkpointing": ("none", "full", "every_k", "offload"),
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
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


# keys of 0.1's development that were renamed: the tuners' own field names, one kernel switch per part
RENAMED = {"run.export_adapter": "run.export_methods", "lora.alpha": "lora.lora_alpha", "lora.dropout": "lora.lora_dropout",
           "prefix.projection": "prefix.prefix_projection", "kernels.fused_loss": "kernels.loss",
           "kernels.fused_layers": "kernels.norms and kernels.mlp"}


def section_from_table(cls, table: dict, name: str, context: str = ""):
    """The section dataclass ``cls`` built from its TOML table ``table`` (``name``: where it sits, e.g. "optim"
    or "recipe.options"; ``context`` is added to the unknown-key message): an unknown key or a value of the
    wrong type is a ConfigError naming it (and the valid keys; a renamed key, its new name). Recipes build
    their options with it too."""
    if not isinstance(table, dict):
        raise ConfigError(f"config section {name!r} must be a table of keys, got {table!r}")
    keys = _section_types(cls)
    for key in table:
        if key not in keys:
            renamed = RENAMED.get(f"{name}.{key}")
            hint = f" (renamed: {renamed})" if renamed else ""
            raise ConfigError(f"unknown config key {name}.{key}{hint}{context}; valid keys of [{name}]: "
                              f"{', '.join(keys)}")
    return cls(**{k: _check_type(f"{name}.{k}", v, keys[k]) for k, v in table.items()})


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
        built[name] = section_from_table(sections[name], value, name)
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
    stack = cfg.kernels.stack
    if cfg.lora.enabled and cfg.prefix.enabled and not stack.lora and not stack.prefix:
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
