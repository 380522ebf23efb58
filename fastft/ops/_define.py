"""One way to define an op: a declaration turns into the registered torch.library op pair, the eager fast
path, per-op backend dispatch and the fp64 rule. The argument checks every functional shares live in
``fastft.ops.checks`` (check_float_tensor, check_same_device, check_reduction, ...); the registry that
drives ``fastft info``, the benchmarks and the generic tests is ``fastft.ops.registry``. A newcomer's
walk-through: docs/ARCHITECTURE.md, "Adding an op".

Example (a toy op; the real ones are fastft/ops/defs/*.py, e.g. fastft/ops/defs/rms_norm.py)::

    @dataclass(frozen=True)
    class ScaleOptions:              # scalar options: flattened into the schema once, rebuilt for your code
        alpha: float = 1.0

    def _forward(x: Tensor, options: ScaleOptions, backend: str) -> tuple[Tensor, Tensor]:
        y = scale_op.kernels(backend).fwd(x, options.alpha)   # the backend's kernel set, bound once
        return y, x.new_empty((0,))      # output 0: the differentiable result; the rest: non-differentiable

    def _fake(x, options, backend):
        return torch.empty_like(x), x.new_empty((0,))

    def _setup(ctx, inputs, outputs):    # inputs: the arguments before ``options``; ctx.options/.backend are set
        ctx.save_for_backward(*inputs)

    def _backward_impl(grad: Tensor, x: Tensor, options: ScaleOptions, backend: str) -> Tensor:
        return grad * options.alpha       # registered as fastft::scale_backward

    def _backward(ctx, grad):            # gradient of output 0 (None when it got none) -> one grad per input
        return (ctx.run_backward(grad, *ctx.saved_tensors),)

    scale_op = define_op(
        "scale", forward=_forward, fake=_fake, setup=_setup, backward=_backward,
        backward_impl=_backward_impl, backward_fake=lambda grad, x, options, backend: torch.empty_like(x),
        options=ScaleOptions, reference=reference.scale,   # pure torch, the public signature
        backends=standard_backends(compiled=extension_kernels(fwd="scale_fwd_kernel"),
                                   triton=triton_kernels("scale", fwd="scale_fwd")),
    )

    def _run_kernels(backend, x, alpha=1.0):
        return scale_op(x, options=ScaleOptions(alpha), backend=backend)[0]

    def scale(x, alpha=1.0):             # the public functional
        check_float_tensor("x", x)
        return scale_op.dispatch(_run_kernels, x, alpha)   # reference.scale(x, alpha) on "reference"

What it generates:
* ``fastft::<name>`` and ``fastft::<name>_backward`` (torch.library.custom_op, schemas inferred from the
  annotations with the options dataclass flattened field by field) with fakes and autograd: the path
  torch.compile traces and opcheck tests.
* An eager twin (a plain torch.autograd.Function over the same forward/setup/backward) used outside
  torch.compile: it skips torch.library's Python dispatch (~0.5 ms a call on this CPU).
* ``select(tensor)``: which backend this op uses for this call (fastft.backend.select_backend), and
  ``dispatch(run_kernels, *args)``: the reference or the kernels on that backend.

One autograd template for every op: only output 0 is differentiable (the others are marked so), and
gradients are not materialized (``backward`` gets None when output 0 got no gradient). Gradients that
forward already computed (the fused losses) are kept with ``save_fused_grads`` and scaled by the
upstream gradient with ``scale_fused_grads``: in place (no copy; a no-op for ``loss.backward()``) when
this is the graph's last backward in eager mode, otherwise out of place, so a second backward
(``retain_graph=True``) gives the same result in eager and compiled mode.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from ..backend import (FLOAT_DTYPES, LOW_AND_FP32, Backend, extension_kernels, standard_backends,  # noqa: F401
                       triton_kernels)

__all__ = ["Backend", "FLOAT_DTYPES", "LOW_AND_FP32", "Op", "accumulator_dtype", "define_op", "extension_kernels",
           "graph_kept", "save_fused_grads", "scale_fused_grads", "standard_backends", "triton_kernels"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in (and return row statistics in): fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Autograd helpers
# ------------------------------------------------------------------------------------------------


def graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when unknown."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None:
        return True
    try:
        return bool(probe())
    except RuntimeError:  # not inside a backward
        return True


def save_fused_grads(ctx, *grads: Tensor) -> None:
    """In ``setup``: keep gradients that forward computed, for ``scale_fused_grads``. Eager: held outside
    the saved-tensor machinery, so backward hands them over with no other reference left and
    AccumulateGrad adopts a leaf's gradient instead of copying it (measured: a [V, H] copy of a head's
    grad_W, +131 MB at V=32000, H=1024). Registered op: saved tensors, as the compiler needs."""
    if ctx.eager:
        ctx.fused_grads = list(grads)
    else:
        ctx.save_for_backward(*grads)


def scale_fused_grads(ctx, grad_output: Tensor, scale_in_place: Callable[[Tensor, Tensor], Any],
                      wanted: Optional[Sequence[bool]] = None) -> list:
    """The gradients kept by ``save_fused_grads`` times the upstream gradient ``grad_output`` (None where
    ``wanted`` is False).

    In place with ``scale_in_place(grad, grad_output)`` (no copy; fastft's ``scale_if_not_one_`` kernels
    skip the usual upstream 1.0) when this is the eager graph's last backward; out of place otherwise
    (torch.compile, the registered op, or ``retain_graph=True``), so a second backward sees the unscaled
    buffers again and eager and compiled runs agree."""
    if ctx.eager:
        if ctx.fused_grads is None:
            raise RuntimeError("Trying to backward through the graph a second time; specify retain_graph=True "
                               "on the first backward")
        grads = ctx.fused_grads
    else:
        grads = ctx.saved_tensors
    if wanted is not None:
        grads = [g if w else None for g, w in zip(grads, wanted)]
    if ctx.eager and not graph_kept():
        ctx.fused_grads = None
        for g in grads:
            if g is not None:
                scale_in_place(g, grad_output)
        return list(grads)
    return [None if g is None else g * grad_output.to(g.dtype) for g in grads]


# ------------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------------


def _flatten_signature(fn: Callable, options: Optional[type]) -> tuple:
    """(signature with the options dataclass replaced by its fields, number of leading inputs, hints)."""
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[-1].name != "backend":
        raise TypeError(f"{fn.__qualname__} must take `backend: str` as its last parameter")
    flat, n_inputs = [], len(params) - 1
    for i, p in enumerate(params):
        hint = hints[p.name]
        if options is not None and hint is options:
            n_inputs = i
            flat += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=fhint)
                     for f, fhint in zip(dataclasses.fields(options), _field_hints(options))]
        else:
            flat.append(p.replace(annotation=hint, default=inspect.Parameter.empty))
    if options is not None and n_inputs == len(params) - 1:
        raise TypeError(f"{fn.__qualname__} must take a parameter annotated {options.__name__} before `backend`")
    sig = inspect.Signature(flat, return_annotation=hints["return"])
    return sig, n_inputs


def _field_hints(options: type) -> list:
    hints = typing.get_type_hints(options)
    return [hints[f.name] for f in dataclasses.fields(options)]


class Op:
    """A defined op; see the module docstring. Call it as ``op(*inputs, options=..., backend=...)``:
    the eager twin outside torch.compile, the registered op inside. Returns the forward's outputs."""

    def __init__(self, name: str, *, forward: Callable, fake: Callable, setup: Callable, backward: Callable,
                 backends: Sequence[Backend], reference: Callable, backward_impl: Optional[Callable] = None,
                 backward_fake: Optional[Callable] = None, options: Optional[type] = None) -> None:
        if options is not None and not (dataclasses.is_dataclass(options)
                                        and options.__dataclass_params__.frozen):
            raise TypeError(f"options of {name} must be a frozen dataclass, got {options!r}")
        names = [b.name for b in backends]
        if "reference" not in names:
            raise ValueError(f"{name} must declare the 'reference' backend (the fallback for every other)")
        self.name = name
        self.backends = {b.name: b for b in backends}
        self.reference = reference
        self.options = options
        self._forward, self._setup, self._backward, self._backward_impl = forward, setup, backward, backward_impl
        self.registered = self._register(name, forward, fake, options)
        self.registered_backward = None
        if backward_impl is not None:
            if backward_fake is None:
                raise TypeError(f"{name}: backward_impl needs backward_fake")
            self.registered_backward = self._register(f"{name}_backward", backward_impl, backward_fake, options)
        self.registered.register_autograd(self._compiled_backward, setup_context=self._compiled_setup)
        self._eager = self._eager_function()
        _backend.register_op(name, self.backends)

    # -- registration ------------------------------------------------------------------------------

    def _register(self, qualname: str, fn: Callable, fake: Callable, options: Optional[type]):
        sig, n_inputs = _flatten_signature(fn, options)
        n_opts = len(dataclasses.fields(options)) if options is not None else 0
        unflatten = self._unflattener(n_inputs, n_opts, options)

        def impl(*args):
            return fn(*unflatten(args))

        impl.__signature__ = sig
        impl.__name__ = fn.__name__
        op = torch.library.custom_op(f"fastft::{qualname}", impl, mutates_args=())

        def fake_impl(*args):
            return fake(*unflatten(args))

        op.register_fake(fake_impl)
        op.n_inputs = n_inputs
        return op

    @staticmethod
    def _unflattener(n_inputs: int, n_opts: int, options: Optional[type]) -> Callable:
        if options is None:
            return lambda args: args

        def unflatten(args):
            return (*args[:n_inputs], options(*args[n_inputs:n_inputs + n_opts]), args[-1])

        return unflatten

    def _check_options(self, options) -> None:
        if self.options is not None and type(options) is not self.options:  # a subclass has other fields
            raise TypeError(f"{self.name} takes options={self.options.__name__}(...), got {options!r}")

    def _flat(self, options) -> tuple:
        if self.options is None:
            return ()
        self._check_options(options)
        return tuple(getattr(options, f.name) for f in dataclasses.fields(options))

    # -- autograd: one template for the eager twin and the registered op ---------------------------

    def _setup_common(self, ctx, inputs: tuple, outputs, options, backend: str, eager: bool) -> None:
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        ctx.set_materialize_grads(False)
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outputs[1:])
        ctx.options, ctx.backend, ctx.eager = options, backend, eager
        ctx.n_inputs = len(inputs)
        if self._backward_impl is not None:
            bwd = self._backward_impl if eager else self.registered_backward
            flat = () if eager else self._flat(options)
            opts = (options,) if eager and self.options is not None else flat
            ctx.run_backward = lambda *args: bwd(*args, *opts, backend)
        self._setup(ctx, inputs, outputs)

    def _compiled_setup(self, ctx, inputs, output) -> None:
        n = self.registered.n_inputs
        options = self.options(*inputs[n:-1]) if self.options is not None else None
        self._setup_common(ctx, tuple(inputs[:n]), output, options, inputs[-1], eager=False)

    def _input_grads(self, ctx, grad_output) -> tuple:
        if grad_output is None:
            grads = (None,) * ctx.n_inputs
        else:
            grads = tuple(self._backward(ctx, grad_output))
            if len(grads) != ctx.n_inputs:
                raise RuntimeError(f"{self.name}: backward returned {len(grads)} gradients for {ctx.n_inputs} inputs")
        return grads

    def _compiled_backward(self, ctx, grad_output, *_non_differentiable):
        n_extra = len(self._flat(ctx.options)) + 1 if self.options is not None else 1
        return (*self._input_grads(ctx, grad_output), *(None,) * n_extra)

    def _eager_function(self) -> type:
        op = self

        def forward(ctx, *args):
            *inputs, options, backend = args
            outputs = op._forward(*inputs, *((options,) if op.options is not None else ()), backend)
            op._setup_common(ctx, tuple(inputs), outputs, options, backend, eager=True)
            return outputs

        def backward(ctx, grad_output, *_non_differentiable):
            if torch.is_grad_enabled():  # create_graph=True: the gradients below are not differentiable
                raise RuntimeError(f"fastft::{op.name}: double backward (create_graph=True) is not supported; its "
                                   "gradients come from saved tensors, so second-order terms would be silently lost")
            return (*op._input_grads(ctx, grad_output), None, None)

        return type(f"_Eager_{self.name}", (torch.autograd.Function,), {
            "__doc__": f"Eager twin of fastft::{self.name} (see fastft.ops._define).",
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    # -- calling -----------------------------------------------------------------------------------

    def __call__(self, *inputs, options=None, backend: str):
        if torch.compiler.is_compiling():
            return self.registered(*inputs, *self._flat(options), backend)
        self._check_options(options)
        return self._eager.apply(*inputs, options, backend)

    def registered_args(self, *inputs, options=None, backend: str) -> tuple:
        """The flat argument tuple of ``self.registered`` for a call ``self(*inputs, options=, backend=)``
        (e.g. for torch.library.opcheck)."""
        return (*inputs, *self._flat(options), backend)

    def select(self, like: Tensor) -> str:
        """The backend for a call whose main input is ``like`` (its device and dtype): fastft.backend.select_backend,
        then the reference where the backend does not compute ``like``'s dtype."""
        name = _backend.select_backend(self.name, like.device.type, _backend.forced())
        if like.dtype not in self.backends[name].dtypes:
            return "reference"  # e.g. fp64 on Triton/CUDA: those kernels compute in fp32; keep fp64 exact
        return name

    def dispatch(self, run_kernels: Callable, *args, **kwargs):
        """The functional's body after its checks: ``self.reference(*args, **kwargs)`` on the "reference" backend
        (chosen, forced, or the fallback), else ``run_kernels(backend, *args, **kwargs)``, which calls this op.
        ``args[0]`` is the main input: its device and dtype choose the backend."""
        backend = self.select(args[0])
        if backend == "reference":
            return self.reference(*args, **kwargs)
        return run_kernels(backend, *args, **kwargs)

    def kernels(self, backend: str):
        """The kernel set of ``backend`` (bound once, on first use; see fastft.backend.Backend)."""
        return self.backends[backend].kernels

    def status(self) -> dict:
        """{backend name: (usable, reason)} for ``fastft info``."""
        return {name: b.status() for name, b in self.backends.items()}


def define_op(name: str, **declaration) -> Op:
    """Define ``fastft::<name>`` from a declaration; see :class:`Op` and the module docstring."""
    return Op(name, **declaration)
