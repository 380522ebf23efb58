"""What every parameter-efficient method (tuner) shares, as PEFT's ``BaseTuner`` but for plain transformers models.

A method's ``apply(model, config)`` adds its modules to the model in place and returns a :class:`TunerHandle`
(``.save(dir)``, ``.state_dict()``, ``.remove()``, ``.merge()`` where the method can merge, ``.report``).
The handles of a model are registered on the transformers model itself (``handles(model)``), which is
what lets the methods compose:

* **One freeze rule.** Applying a method freezes the *base model's* parameters only: every parameter that
  no registered method claims. A method applied after another never freezes the other's parameters
  (prefix after LoRA keeps LoRA training). The parameters' ``requires_grad`` flags from before the first
  method are kept, and put back when the last method is removed.
* **One unwrap rule** (:func:`unwrap`): a PEFT ``PeftModel`` stands for the transformers model inside it.
* **One file layout**: ``<config file>`` (JSON) + ``<weights file>`` (safetensors) per method and folder;
  LoRA and prefix tuning write PEFT's own names and format, bottleneck adapters their own (never
  PEFT's ``adapter_config.json`` name, which PEFT would try to read).
"""
from __future__ import annotations

import contextlib
import json
import os
import logging
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

logger = logging.getLogger(__name__)

# PEFT's file names (peft.utils.constants): LoRA and prefix tuning are read and written in PEFT's format.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_WEIGHTS_NAME_BIN = "adapter_model.bin"
# fastft's own format (bottleneck adapters: PEFT has no such method)
BOTTLENECK_CONFIG_NAME = "bottleneck_config.json"
BOTTLENECK_WEIGHTS_NAME = "bottleneck_model.safetensors"

_REGISTRY_ATTR = "_fastft_tuners"


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model a PEFT ``PeftModel`` wraps (``get_base_model()``), else ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass
class TunerReport:
    """What a method added, with counts like PEFT's ``print_trainable_parameters`` (of the whole model, all
    methods on it together)."""

    method: str
    trainable_params: int
    all_params: int
    modules: list = field(default_factory=list)  # where the method put its modules (qualified names)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.all_params, 1)

    def __str__(self) -> str:
        return (f"{self.method}: trainable params: {self.trainable_params:,} || all params: {self.all_params:,} || "
                f"trainable%: {self.trainable_percent:.4f} || modules: {len(self.modules)}")


class _Registry:
    """The methods on one model, and its parameters' ``requires_grad`` from before the first of them."""

    def __init__(self, root: nn.Module) -> None:
        self.handles: dict[str, TunerHandle] = {}
        self.requires_grad = [(p, p.requires_grad) for p in root.parameters()]


def handles(model: nn.Module) -> dict:
    """{method name: handle} of the methods applied to ``model`` (or to the model a PeftModel wraps)."""
    registry = vars(unwrap(model)).get(_REGISTRY_ATTR)
    return dict(registry.handles) if registry is not None else {}


def get_handle(model: nn.Module, method: str) -> "TunerHandle":
    handle = handles(model).get(method)
    if handle is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no fastft {method} (apply it first)")
    return handle


def check_not_applied(model: nn.Module, method: str) -> None:
    if method in handles(model):
        raise ValueError(f"the model already has fastft {method}; remove it (handle.remove()) first: one per model")


def is_sharded(tensor) -> bool:
    """A DTensor (FSDP2 shards parameters into them)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return False
    return isinstance(tensor, DTensor)


def gather_full(tensors: dict) -> dict:
    """Every tensor whole, detached, as a contiguous CPU copy (no shared storage); sharded (DTensor) ones
    are gathered first, which is a collective: under sharding every rank must call this."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu().contiguous().clone()
            for k, v in sorted(tensors.items())}


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


class TunerHandle:
    """One method applied to one model. Subclasses say what the method owns (:meth:`parameters`), what
    its files hold (:meth:`_file_tensors`, :meth:`_file_config`) and how to take it out (:meth:`_detach`);
    registering, freezing, saving and the report are shared here.

    ``model``: what to call and train: the model passed to ``apply``, except where the stock
    implementation of a method wraps it (PEFT's prefix tuning returns a ``PeftModel``).
    """

    method: str = ""
    config_name: str = PEFT_CONFIG_NAME
    weights_name: str = PEFT_WEIGHTS_NAME

    def __init__(self, model: nn.Module, config, *, fused: bool) -> None:
        self.model = model
        self.config = config
        self.fused = fused

    @property
    def root(self) -> nn.Module:
        """The transformers model the method is on."""
        return unwrap(self.model)

    # -- what each method defines --------------------------------------------------------------------

    def parameters(self) -> dict:
        """{name: parameter} of what this method trains (names relative to :attr:`model`)."""
        raise NotImplementedError

    def _modules(self) -> list:
        """Qualified names of the modules the method added or wrapped (for the report)."""
        raise NotImplementedError

    def _file_tensors(self) -> dict:
        """The tensors :meth:`save` writes, under the file's key names (may be sharded: they are gathered)."""
        raise NotImplementedError

    def _file_config(self) -> dict:
        raise NotImplementedError

    def _detach(self) -> None:
        """Take the method's modules and hooks out of the model."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------

    def register(self, trainable: Optional[bool] = True) -> "TunerHandle":
        """(Called by a method's ``apply`` inside ``applying``.) Register on the model, freeze the base model (what no method claims), set this method's
        parameters' ``requires_grad`` to ``trainable`` (None: leave them as they are). Called by each method's ``apply`` once its modules
        are in place; the model's flags before the first method are those :class:`_Registry` keeps."""
        root = self.root
        registry = vars(root).get(_REGISTRY_ATTR)
        if registry is None:
            raise RuntimeError("TunerHandle.register outside `with applying(model, method)`")
        registry.handles[self.method] = self
        claimed = {id(p) for h in registry.handles.values() for p in h.parameters().values()}
        for p in root.parameters():
            if id(p) not in claimed:
                p.requires_grad_(False)
        if trainable is not None:
            self.set_trainable(trainable)
        logger.info("%s", self.report)
        return self

    def set_trainable(self, trainable: bool = True) -> None:
        for p in self.parameters().values():
            p.requires_grad_(trainable)

    def state_dict(self) -> dict:
        """The tensors :meth:`save` writes, whole and on the CPU, under the file's key names. Gathers sharded
        (DTensor) parameters: under sharding every rank must call it."""
        return gather_full(self._file_tensors())

    def save(self, directory: str, *, is_main_process: bool = True) -> None:
        """Write the method's config and weights to ``directory`` (``config_name`` + ``weights_name``).
        Under sharding every rank calls it (parameters are gathered) and ``is_main_process`` (rank 0) writes."""
        from safetensors.torch import save_file

        tensors = self.state_dict()
        if not is_main_process:
            return
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, os.path.join(directory, self.weights_name), metadata={"format": "pt"})
        with open(os.path.join(directory, self.config_name), "w") as f:
            json.dump(self._file_config(), f, indent=2, sort_keys=True, default=str)

    def merge(self) -> nn.Module:
        raise TypeError(f"{self.method} cannot be merged into the base weights (it adds computation, not a weight "
                        "delta); use remove() to take it out")

    def remove(self) -> nn.Module:
        """Take the method out: the model computes what it did before ``apply``. When it was the last
        method, every parameter's ``requires_grad`` is as it was before the first one. Returns the
        transformers model."""
        root = self.root
        registry = vars(root).get(_REGISTRY_ATTR)
        if registry is None or registry.handles.get(self.method) is not self:
            raise ValueError(f"this {self.method} handle is not applied to the model (removed already?)")
        own = self.parameters()
        self._detach()
        del registry.handles[self.method]
        if not registry.handles:
            for p, flag in registry.requires_grad:
                p.requires_grad_(flag)
            delattr(root, _REGISTRY_ATTR)
        else:  # base parameters the method trained (LoRA's biases, modules_to_save) are base again: frozen
            base = {id(p) for p, _ in registry.requires_grad}
            for p in own.values():
                if id(p) in base:
                    p.requires_grad_(False)
        return root

    @property
    def report(self) -> TunerReport:
        trainable, total = count_parameters(self.model)
        return TunerReport(self.method, trainable, total, list(self._modules()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} fused={self.fused} config={self.config!r}>"


@contextlib.contextmanager
def applying(model: nn.Module, method: str, config=None, config_class: Optional[type] = None):
    """Around a method's ``apply`` (yields the transformers model): checks ``model``, ``config`` (an
    instance of ``config_class``, when given) and that the method is not on the model yet, keeps the
    model's ``requires_grad`` flags before its first method, and forgets them if the apply fails."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config_class is not None and not isinstance(config, config_class):
        raise TypeError(f"config must be a fastft.tuners.{config_class.__name__}, got {type(config).__name__}")
    check_not_applied(model, method)
    root = unwrap(model)
    if _REGISTRY_ATTR not in vars(root):
        setattr(root, _REGISTRY_ATTR, _Registry(root))
    try:
        yield root
    except BaseException:
        registry = vars(root).get(_REGISTRY_ATTR)
        if registry is not None and not registry.handles:
            delattr(root, _REGISTRY_ATTR)
        raise
