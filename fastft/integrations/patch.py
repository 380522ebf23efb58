"""``fastft.patch(model)``: one call that puts fastft's fused kernels into a live Hugging Face model.

    handle = fastft.patch(model)          # a transformers model, a PeftModel, an FSDP2-sharded model,
    print(handle.report)                  # or a torch.compile'd model (its original module is patched)
    ... train ...
    handle.undo()                         # the instance exactly as it was

What it patches, per instance (no class and no module global is touched):

* ``loss``: the causal-LM loss of a labelled forward goes through the fused linear cross-entropy
  (``fastft.integrations.causal_lm_loss.patch_causal_lm_loss``): the [tokens x vocab] logits are never
  built. The head may be a plain Linear or a LoRA'd one (PEFT ``target_modules`` with ``lm_head``,
  tied to the embedding or not). Logit transforms come from the config (Gemma softcap, Cohere
  ``logit_scale``, Granite ``logits_scaling``).
* ``lora``: every PEFT LoRA Linear (one adapter, plain LoRA) computes its forward with fastft's fused
  LoRA op (``fastft.nn.LoRALinear``), on the PEFT layer's own parameters, read at each call (so an
  FSDP2-unsharded parameter is the one used). The PEFT layer stays where it is: PEFT's
  ``save_pretrained``, ``disable_adapter()`` (a reference model in TRL), merging and adapter switching
  keep working, and a disabled, merged or mixed-batch call runs PEFT's own forward.
* ``layers``: the RMSNorm and SwiGLU-MLP modules of the named architectures run fastft.nn.RMSNorm's
  and fastft.nn.SwiGLU's fused ops on their own weights.
fastft's own methods (``fastft.tuners``) already run fastft's kernels (chosen by their ``fused`` argument);
the report lists bottleneck adapters and prefix tuning as found, and other PEFT tuners as stock.

Dispatch is by ``config.model_type``: the named architectures (``ARCHITECTURES``) are tested by
fastft's convergence tests; any other causal LM with a plain Linear head and the ForCausalLM loss goes
through the generic path, which first compares the patched loss with the stock loss on one batch and
leaves the loss stock (and says so) if they differ. ``handle.report`` lists what was patched and what
was left stock, with the reason; ``verbose=True`` prints it.
"""
from __future__ import annotations

import logging
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..tuners.base import handles, unwrap
from . import causal_lm_loss

__all__ = ["ARCHITECTURES", "AutoModelForCausalLM", "PatchEntry", "PatchHandle", "PatchReport", "get_handle", "patch"]

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_fastft_patch_handle"
_LORA_ATTR = "_fastft_lora"
_LAYER_ATTR = "_fastft_layer"
_LOGIT_TRANSFORM_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class Architecture:
    """What fastft fuses in one model_type (tested per entry in tests/integrations)."""

    logit_transforms: tuple = ()  # config attributes its forward applies to the logits
    norm: str = ""  # "llama" (LlamaRMSNorm), "gemma" (1 + weight, fp32 product), "olmo2" (fp32 product), "" none
    swiglu_mlp: bool = False  # its MLP is down(silu(gate(x)) * up(x)) with separate gate/up Linears
    lora_note: str = ""  # where LoRA cannot be fused


ARCHITECTURES = {
    "llama": Architecture(norm="llama", swiglu_mlp=True),
    "mistral": Architecture(norm="llama", swiglu_mlp=True),
    "qwen2": Architecture(norm="llama", swiglu_mlp=True),
    "qwen3": Architecture(norm="llama", swiglu_mlp=True),
    "gemma2": Architecture(logit_transforms=("final_logit_softcapping",), norm="gemma"),
    "gemma3_text": Architecture(logit_transforms=("final_logit_softcapping",), norm="gemma"),
    "phi3": Architecture(norm="llama"),  # its MLP has one fused gate_up_proj
    "granite": Architecture(logit_transforms=("logits_scaling",), norm="llama", swiglu_mlp=True),
    "olmo2": Architecture(norm="olmo2", swiglu_mlp=True),
    "cohere": Architecture(logit_transforms=("logit_scale",), swiglu_mlp=True),  # LayerNorm, not RMSNorm
    "gpt_neox": Architecture(),
    "gpt2": Architecture(lora_note="attention and MLP projections are Conv1D (PEFT fan_in_fan_out)"),
}

# (casting_mode, offset, eps attribute) of fastft.ops.rms_norm for each norm flavour above.
_NORM_FLAVOURS = {"llama": ("llama", 0.0, "variance_epsilon"), "olmo2": ("gemma", 0.0, "variance_epsilon"),
                  "gemma": ("gemma", 1.0, "eps")}
_SILU_NAMES = ("silu", "swish")


# ------------------------------------------------------------------------------------------------
# Report and handle
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchEntry:
    part: str  # "loss", "lora", "layers", "bottleneck", "prefix", "model"
    module: str  # qualified module name ("" for the model)
    fused: bool
    detail: str  # what runs, or why it was left stock


@dataclass
class PatchReport:
    model_type: Optional[str]
    path: str  # "named" (tested architecture), "generic" (checked on one batch) or "" (loss not patched)
    entries: list = field(default_factory=list)

    def add(self, part: str, module: str, fused: bool, detail: str) -> None:
        self.entries.append(PatchEntry(part, module, fused, detail))

    def fused(self, part: Optional[str] = None) -> list:
        return [e for e in self.entries if e.fused and (part is None or e.part == part)]

    def stock(self, part: Optional[str] = None) -> list:
        return [e for e in self.entries if not e.fused and (part is None or e.part == part)]

    def __str__(self) -> str:
        lines = [f"fastft.patch: model_type={self.model_type!r}" + (f" ({self.path} path)" if self.path else "")]
        for part in dict.fromkeys(e.part for e in self.entries):
            groups: dict = {}
            for e in self.entries:
                if e.part == part:
                    groups.setdefault((e.fused, e.detail), []).append(e.module or "model")
            for (fused, detail), modules in groups.items():
                where = modules[0] if len(modules) == 1 else f"{len(modules)} modules, e.g. {modules[0]}"
                lines.append(f"  {part:8s} {'fused' if fused else 'STOCK'}  {where}: {detail}")
        return "\n".join(lines)


class PatchHandle:
    """What :func:`patch` did to one model; ``undo()`` restores the instance exactly (idempotent).

    The undo steps are data (module, attribute, previous value), not closures, so that a deepcopy of a
    patched model (an EMA or reference model) carries a handle that undoes the copy, not the original."""

    def __init__(self, model: nn.Module, report: PatchReport) -> None:
        self.model = model
        self.report = report  # everything patched (or left stock) by every patch() call on the model
        self.latest = report  # what the last patch() call added (a repeat call patches what is new)
        self._undo_steps: list = []  # ("forward", module, state attribute) | ("loss", root)
        self.undone = False
        self._first_forward_hook = None  # removable handle of _fuse_late_lora_layers
        self.options: dict = {}  # the options of the first patch() call (a late fuse repeats them)

    def undo(self) -> nn.Module:
        if self._first_forward_hook is not None:
            self._first_forward_hook.remove()
            self._first_forward_hook = None
        _undo(self._undo_steps)
        vars(self.model).pop(_HANDLE_ATTR, None)
        self.undone = True
        return self.model

    def __repr__(self) -> str:
        state = "undone" if self.undone else f"{len(self.report.fused())} parts fused"
        return f"<fastft.PatchHandle {type(self.model).__name__} ({state})>"


def _undo(steps: list) -> None:
    """Undo ``steps`` (emptied), last first."""
    while steps:
        step = steps.pop()
        if step[0] == "forward":
            _, module, attr = step
            vars(module).pop(attr, None)
            vars(module).pop("forward", None)
        else:
            _unpatch_loss(step[1])


def get_handle(model: nn.Module) -> Optional[PatchHandle]:
    """The handle of the live :func:`patch` on ``model`` (or None)."""
    return vars(_unwrap(model)[0]).get(_HANDLE_ATTR)


# ------------------------------------------------------------------------------------------------
# patch
# ------------------------------------------------------------------------------------------------


def patch(model: nn.Module, *, loss: bool = True, lora: bool = True, layers: bool = True,
          verbose: bool = False, return_logits: bool = False, check: str = "auto") -> PatchHandle:
    """Patch ``model`` in place with fastft's fused kernels; returns a :class:`PatchHandle` (``.report``,
    ``.undo()``). ``model``: a transformers causal LM, a PeftModel around one, an FSDP2-sharded one, or a
    torch.compile'd one (its ``_orig_mod`` is patched; the compiled wrapper retraces on its next call).

    ``loss`` / ``lora`` / ``layers`` switch the parts (see the module docstring); ``layers`` may also name
    one kind of layer, "norms" (RMSNorm) or "mlp" (SwiGLU MLP), to patch only that one.
    ``return_logits``: labelled forwards also return logits (they are then built). ``check``: "auto"
    compares patched and stock loss on one batch for architectures not in ``ARCHITECTURES``, "always"
    for every model, "never" skips it. ``verbose`` prints the report.

    On a model patched already, ``patch`` patches what is new since (e.g. the PEFT LoRA layers that
    ``get_peft_model`` added after ``fastft.AutoModelForCausalLM``, or a LoRA'd output layer) and returns
    the same handle: ``handle.latest`` lists what this call added, ``handle.report`` everything. Nothing
    patched before is undone, whatever the switches of the repeat call say."""
    if check not in ("auto", "always", "never"):
        raise ValueError(f"check must be 'auto', 'always' or 'never', got {check!r}")
    if layers not in (True, False, "norms", "mlp"):
        raise ValueError(f"layers must be True, False, 'norms' or 'mlp', got {layers!r}")
    root, notes = _unwrap(model)
    if not isinstance(getattr(getattr(root, "config", None), "model_type", None), str):
        raise TypeError(f"fastft.patch takes a Hugging Face transformers model (with a config.model_type), got "
                        f"{type(root).__name__}")
    model_type = root.config.model_type
    live = vars(root).get(_HANDLE_ATTR)
    handle = live if live is not None else PatchHandle(root, PatchReport(model_type, ""))
    report = PatchReport(model_type, handle.report.path)  # this call's findings
    steps_before = len(handle._undo_steps)
    for note in notes:
        report.add("model", "", True, note)
    try:
        _patch_lora(root, handle, report, enabled=lora)
        _report_tuners(root, report)
        _patch_layers(root, handle, report, enabled=layers)
        if loss:
            _patch_loss(root, handle, report, check=check, return_logits=return_logits)
        else:
            report.add("loss", "", False, "loss=False")
    except BaseException:
        if live is None:
            handle.undo()
        else:  # a repeat call: undo only its own steps
            handle._undo_steps, new_steps = handle._undo_steps[:steps_before], handle._undo_steps[steps_before:]
            _undo(new_steps)
        raise
    if live is None:
        handle.report = handle.latest = report
        vars(root)[_HANDLE_ATTR] = handle
        handle.options = dict(loss=loss, lora=lora, layers=layers, return_logits=return_logits,
                              check=check)
        handle._first_forward_hook = root.register_forward_pre_hook(_fuse_late_lora_layers)
        logger.info("%s", report)
    else:
        known = set(handle.report.entries)
        handle.latest = PatchReport(model_type, report.path, [e for e in report.entries if e not in known])
        handle.report.entries.extend(handle.latest.entries)
        handle.report.path = report.path
        logger.info("fastft.patch on a patched model, new since the last call:\n%s", handle.latest)
    if verbose:
        print(handle.latest)
    return handle


def _fuse_late_lora_layers(root: nn.Module, args) -> None:
    """Forward pre-hook of a patched model, removed at its first (eager) call: PEFT LoRA layers added since
    the patch (``fastft.AutoModelForCausalLM`` then ``get_peft_model`` without a second ``fastft.patch``) are
    fused now, with a warning naming the explicit order, instead of running stock silently."""
    if torch.compiler.is_compiling():
        return  # no module surgery inside a trace; a compiled model is patched by explicit calls
    handle = vars(root).get(_HANDLE_ATTR)
    if handle is None:
        return
    hook, handle._first_forward_hook = handle._first_forward_hook, None
    if hook is not None:
        hook.remove()
    late = _unfused_peft_lora_layers(root, handle) if handle.options.get("lora", True) else []
    if late:
        patch(root, **handle.options)
        warnings.warn(f"fastft: {len(late)} PEFT LoRA layers were added after fastft.patch (e.g. {late[0]}); fused "
                      "them at the model's first forward. Call fastft.patch(model) after get_peft_model, or train "
                      "with fastft.integrations.hf_trainer.FastftCallback, to do it explicitly.", stacklevel=2)


def _unfused_peft_lora_layers(root: nn.Module, handle: PatchHandle) -> list:
    """Names of the PEFT LoRA layers of ``root`` that no patch call has seen yet."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    seen = {e.module for e in handle.report.entries if e.part == "lora"}
    return [name for name, m in root.named_modules()
            if isinstance(m, LoraLayer) and _LORA_ATTR not in vars(m) and name not in seen]


def _unwrap(model: nn.Module) -> tuple[nn.Module, list]:
    """(the transformers model to patch, notes for the report)."""
    notes = []
    outer = model
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        notes.append("torch.compile'd model: its _orig_mod is patched; the compiled wrapper retraces on its next call")
        model = inner
    if unwrap(model) is not model:
        model = unwrap(model)
        notes.append(f"PeftModel: patched the {type(model).__name__} inside it")
    from .._fsdp import FSDPModule

    if FSDPModule is not None and (isinstance(model, FSDPModule) or isinstance(outer, FSDPModule)):
        notes.append("FSDP2-sharded model: layers read their (unsharded) parameters at each call")
    return model, notes


# ------------------------------------------------------------------------------------------------
# Instance-forward overrides (LoRA and layers): one mechanism, undone by restoring the attribute
# ------------------------------------------------------------------------------------------------


def _override_forward(handle: PatchHandle, module: nn.Module, forward, attr: str, state) -> Optional[str]:
    """Give ``module`` the instance forward ``forward`` (its per-module ``state`` in ``attr``); None, or why
    not: a module that already has an instance forward (an accelerate hook, another patch) keeps it, since
    the fused forward would bypass it. A module that has this very override already (a repeat patch) is
    left as it is."""
    current = vars(module).get("forward")
    if attr in vars(module) and getattr(current, "__func__", None) is forward:
        return None
    if current is not None:
        previous = vars(module)["forward"]
        return (f"{type(module).__name__} already has an instance forward "
                f"({getattr(previous, '__qualname__', type(previous).__name__)}); fastft does not bypass it")
    vars(module)[attr] = state
    module.forward = types.MethodType(forward, module)
    handle._undo_steps.append(("forward", module, attr))
    return None


def _patch_lora(root: nn.Module, handle: PatchHandle, report: PatchReport, *, enabled: bool) -> None:
    from ..nn.lora import LoRALinear

    for name, module in root.named_modules():
        if isinstance(module, LoRALinear):
            report.add("lora", name, True, "fastft LoRALinear (fused already)")
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    for name, module in root.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLayer):
            report.add("lora", name, False, f"PEFT {type(module).__name__} is not LoRA; fastft has no kernel for it")
            continue
        if _LORA_ATTR in vars(module):  # fused by an earlier call
            report.add("lora", name, True, _PEFT_LORA_FUSED)
            continue
        if not enabled:
            report.add("lora", name, False, "lora=False")
            continue
        delegate, reason = _fused_lora_delegate(module)
        if delegate is None:
            report.add("lora", name, False, reason)
            continue
        reason = _override_forward(handle, module, _fused_peft_lora_forward, _LORA_ATTR,
                                   (next(iter(module.lora_A)), delegate))
        report.add("lora", name, reason is None, reason or _PEFT_LORA_FUSED)


_PEFT_LORA_FUSED = "PEFT lora.Linear runs fastft's fused LoRA op on its own parameters"


def _fused_lora_delegate(module: nn.Module):
    """(a fastft LoRALinear computing ``module``'s forward, None) or (None, why not), checked by
    fastft.tuners.layer_from_peft's rules (one plain-LoRA adapter on an nn.Linear, unmerged, no lora_bias)."""
    from ..tuners import layer_from_peft

    try:
        layer = layer_from_peft(module)
    except ValueError as error:
        return None, str(error)
    if module.lora_variant:
        return None, f"LoRA variant {type(next(iter(module.lora_variant.values()))).__name__} (fastft fuses plain LoRA)"
    return layer, ""


def _fused_peft_lora_forward(self, x, *args, **kwargs):
    adapter, delegate = vars(self)[_LORA_ATTR]
    if args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != [adapter]:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own path (mixed batch, disabled, merged)
    # Read the parameters now: FSDP2 puts the unsharded ones on the PEFT modules for the call.
    delegate._parameters["lora_A"] = self.lora_A[adapter].weight
    delegate._parameters["lora_B"] = self.lora_B[adapter].weight
    delegate.training = self.training
    return delegate(x)


def _report_tuners(root: nn.Module, report: PatchReport) -> None:
    """fastft's bottleneck adapters and prefix (fastft.tuners) as they are: patch changes neither."""
    methods = handles(root)
    if "bottleneck" in methods:
        fused = methods["bottleneck"].fused
        report.add("bottleneck", "", fused, "fastft bottleneck adapters run fastft.ops.adapter (fused already)"
                   if fused else "fastft bottleneck adapters built with fused=False (eager torch)")
    if "prefix" in methods:
        report.add("prefix", "", False, "prefix tuning is a key/value cache prefix: nothing to fuse")


def _patch_layers(root: nn.Module, handle: PatchHandle, report: PatchReport, *, enabled) -> None:
    """``enabled``: True (norms and MLPs), False, "norms" or "mlp"."""
    arch = ARCHITECTURES.get(root.config.model_type)
    if not enabled:
        report.add("layers", "", False, "layers=False")
        return
    norms, mlps = enabled in (True, "norms"), enabled in (True, "mlp")
    if arch is None:
        report.add("layers", "", False, f"model_type {root.config.model_type!r} has no fused-layer table entry")
        return
    text_config = root.config.get_text_config() if hasattr(root.config, "get_text_config") else root.config
    # the transformers class (FSDP2 puts a subclass of it, FSDP<Name>, on a sharded model)
    model_class = next(c for c in type(root).__mro__ if c.__module__.startswith("transformers.") or c is nn.Module)
    prefix = model_class.__name__.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    norm_class = f"{prefix}RMSNorm"
    for name, module in root.named_modules():
        cls = type(module).__name__
        if cls == norm_class and not norms:
            report.add("layers", name, False, f"layers={enabled!r}")
        elif cls.endswith("MLP") and hasattr(module, "down_proj") and not mlps:
            report.add("layers", name, False, f"layers={enabled!r}")
        elif arch.norm and cls == norm_class:
            casting_mode, offset, eps_attr = _NORM_FLAVOURS[arch.norm]
            reason = _override_forward(handle, module, _fused_rms_norm_forward, _LAYER_ATTR,
                                       (casting_mode, offset, eps_attr))
            report.add("layers", name, reason is None,
                       reason or f"{cls} runs fastft.nn.RMSNorm's op ({casting_mode}, offset {offset:g})")
        elif cls.endswith("MLP") and hasattr(module, "down_proj"):
            act = getattr(text_config, "hidden_act", None) or getattr(text_config, "hidden_activation", None)
            if arch.swiglu_mlp and act in _SILU_NAMES and hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
                reason = _override_forward(handle, module, _fused_swiglu_forward, _LAYER_ATTR, None)
                report.add("layers", name, reason is None,
                           reason or f"{cls} runs fastft.nn.SwiGLU's op (gate/up/down stay its Linears)")
            else:
                why = (f"hidden_act={act!r} is not SwiGLU" if act not in _SILU_NAMES else
                       f"{cls} is not a gate/up/down SwiGLU MLP")
                report.add("layers", name, False, why)
    if not arch.norm:
        report.add("layers", "", False, f"{model_class.__name__}'s norms are LayerNorm: no fastft kernel")
    if mlps and not any(e.part == "layers" and "SwiGLU" in e.detail for e in report.entries):
        report.add("layers", "", False, f"{model_class.__name__}'s MLP is not a gate/up/down SwiGLU: no fastft kernel")


def _fused_rms_norm_forward(self, hidden_states):
    from ..ops.defs.rms_norm import rms_norm

    casting_mode, offset, eps_attr = vars(self)[_LAYER_ATTR]
    return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset=offset, casting_mode=casting_mode)


def _fused_swiglu_forward(self, x):
    from ..nn.swiglu import SwiGLU

    return SwiGLU.forward(self, x)  # down_proj(swiglu(gate_proj(x), up_proj(x))) on this module's projections


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def _patch_loss(root: nn.Module, handle: PatchHandle, report: PatchReport, *, check: str,
                return_logits: bool) -> None:
    info = causal_lm_loss.patch_info(root)
    if info is not None:
        if info.lm_head is root.get_output_embeddings():
            return  # fused by an earlier call, on the head the model still has
        # The output layer was replaced since (PEFT LoRA'd it): move the patch to the new head.
        causal_lm_loss.unpatch(root)
        handle._undo_steps.remove(("loss", root))
    config = root.config.get_text_config() if hasattr(root.config, "get_text_config") else root.config
    arch = ARCHITECTURES.get(root.config.model_type)
    named = arch is not None
    transforms = [a for a in _LOGIT_TRANSFORM_ATTRIBUTES if getattr(config, a, None) is not None]
    if named and not set(transforms) <= set(arch.logit_transforms):
        named = False  # a config that names a transform the table does not expect: check it like an unknown model
    run_check = check == "always" or (check == "auto" and not named)
    stock_loss = None
    if run_check:
        stock_loss, why = _one_batch_loss(root)
        if stock_loss is None:
            report.add("loss", "", False, f"the one-batch check could not run the stock model: {why}")
            return
    try:
        causal_lm_loss.patch_causal_lm_loss(root, return_logits=return_logits)
    except (TypeError, ValueError) as error:
        report.add("loss", "", False, str(error))
        return
    handle._undo_steps.append(("loss", root))
    if run_check:
        fused_loss, why = _one_batch_loss(root)
        tolerance = _loss_tolerance(root)
        if fused_loss is None or not math.isclose(fused_loss, stock_loss, rel_tol=tolerance, abs_tol=tolerance):
            causal_lm_loss.unpatch(root)
            handle._undo_steps.pop()
            found = why if fused_loss is None else f"patched loss {fused_loss!r} != stock loss {stock_loss!r}"
            report.add("loss", "", False, f"generic path: the one-batch check failed ({found}); left stock")
            return
    report.path = "named" if named else "generic"
    state = causal_lm_loss.patch_info(root)
    what = ["fused linear cross-entropy, no [tokens x vocab] logits"]
    if state.softcap is not None:
        what.append(f"softcap {state.softcap:g} (final_logit_softcapping)")
    if state.logit_multiplier is not None:
        what.append(f"logit multiplier {state.logit_multiplier:g} (from the config)")
    if type(state.lm_head) is not nn.Linear:
        what.append("LoRA'd head fused (LoRA coordinates appended to the hidden states, B to the weight)")
    emb = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is getattr(state.lm_head, "weight", False):
        what.append("tied to the input embedding")
    note = _wrapper_note(state.previous_forward)
    if note is not None:
        what.append(note)
    if run_check:
        what.append(f"checked on one batch: {fused_loss:.6g} vs stock {stock_loss:.6g}")
    report.add("loss", _module_name(root, state.lm_head), True, "; ".join(what))


def _unpatch_loss(root: nn.Module) -> None:
    current = vars(root).get("forward")
    if not getattr(getattr(current, "__func__", None), "fastft_patched", False):
        wrapper = getattr(current, "__qualname__", current)
        warnings.warn(f"{type(root).__name__}.forward was wrapped after fastft.patch ({wrapper}); "
                      "undo restores the forward from before the patch, without that wrapper", stacklevel=3)
    causal_lm_loss.unpatch(root)


def _wrapper_note(previous_forward) -> Optional[str]:
    """A note when the model's forward was already wrapped by a trainer that computes the loss itself."""
    if "add_fused_lm_head" in getattr(previous_forward, "__qualname__", ""):
        return ("model.forward is TRL's fused LM head (add_fused_lm_head): its fused_lm_head=True calls compute TRL's "
                "loss (fastft.integrations.trl.patch() routes them to fastft); other labelled calls are fused here")
    return None


def _module_name(root: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in root.named_modules() if m is module), "lm_head")


def _loss_tolerance(root: nn.Module) -> float:
    dtype = next(root.parameters()).dtype
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def _one_batch_loss(root: nn.Module) -> tuple[Optional[float], str]:
    """The model's loss on a fixed small batch (eval mode, no grad, the caller's RNG state untouched)."""
    head = root.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or root.config.get_text_config().vocab_size
    device = next(root.parameters()).device
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    training_flags = [(m, m.training) for m in root.modules()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            root.eval()
            out = root(input_ids=ids, labels=ids)
        loss = getattr(out, "loss", None)
        if loss is None:
            return None, "its forward returned no loss for labels"
        return float(loss), ""
    except Exception as error:  # any failure of an unknown model's forward: report it, leave the loss stock
        return None, f"{type(error).__name__}: {error}"
    finally:
        for module, flag in training_flags:
            module.training = flag


# ------------------------------------------------------------------------------------------------
# Auto class
# ------------------------------------------------------------------------------------------------

_PATCH_OPTIONS = ("loss", "lora", "layers", "verbose", "return_logits", "check")


class AutoModelForCausalLM:
    """``transformers.AutoModelForCausalLM`` whose models come back patched by :func:`patch` (like Liger's
    ``AutoLigerKernelForCausalLM``). The options of :func:`patch` may be passed along with transformers'
    own arguments; the handle is ``fastft.integrations.patch.get_handle(model)``.

        model = fastft.AutoModelForCausalLM.from_pretrained("path/or/id", dtype=torch.bfloat16)
    """

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("fastft.AutoModelForCausalLM is used through from_pretrained(...) or from_config(...)")

    @staticmethod
    def _split(kwargs: dict) -> dict:
        return {k: kwargs.pop(k) for k in _PATCH_OPTIONS if k in kwargs}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> nn.Module:
        import transformers

        options = cls._split(kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        patch(model, **options)
        return model

    @classmethod
    def from_config(cls, config, **kwargs) -> nn.Module:
        import transformers

        options = cls._split(kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        patch(model, **options)
        return model
