"""Every public op, registered once, next to its definition (the bottom of fastft/ops/<op>.py).

Read by ``python -m fastft info`` (backends and whether each is usable here), by
``benchmarks/run_ops.py`` (which benchmark module covers the op) and by tests/test_ops_generic.py
(parity on every usable backend and dtype against an fp64 truth, opcheck, torch.compile, bad inputs, a
second backward). An entry says how to call the op on small inputs and what the right answer is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ._define import FLOAT_DTYPES, Op

__all__ = ["BadInput", "OpEntry", "Sample", "entries", "get", "register"]


@dataclass
class Sample:
    """One call: ``functional(*args, **kwargs)``. Tensors with requires_grad are the leaves whose
    gradients are checked; the first output is what is compared."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True)
class BadInput:
    """A call that must raise ``error`` with a message matching ``match`` (a regex)."""

    args: tuple
    kwargs: dict
    error: type
    match: str


@dataclass(frozen=True)
class OpEntry:
    """name        the public name (fastft.ops.<name>).
    functional     the public function.
    op             the defined op (fastft.ops._define.Op) whose backends it dispatches to; None for an
                   op that is plain torch (no custom op, so no opcheck and only the reference backend).
    samples        (dtype, device) -> [Sample]: tiny, odd shapes (the Triton interpreter is slow).
    truth          a plain-torch function with the functional's signature: run in fp64 it is the exact
                   answer, run in the sample's dtype it gives torch's own error for the 2x rule.
    bad_inputs     (device) -> [BadInput].
    dtypes         the input dtypes the op takes.
    benchmark      the benchmarks/bench_<benchmark>.py module that measures it, or None.
    """

    name: str
    functional: Callable
    op: Optional[Op]
    samples: Callable
    truth: Callable
    bad_inputs: Callable
    dtypes: tuple = FLOAT_DTYPES
    benchmark: Optional[str] = None

    @property
    def backends(self) -> tuple:
        return tuple(self.op.backends) if self.op is not None else ("reference",)

    def status(self) -> dict:
        """{backend: (usable, why)} for this op on this machine."""
        if self.op is None:
            return {"reference": (True, "plain torch (elementwise; torch.compile fuses it)")}
        return self.op.status()


_ENTRIES: dict = {}


def register(entry: OpEntry) -> OpEntry:
    if entry.name in _ENTRIES and _ENTRIES[entry.name] is not entry:
        raise ValueError(f"op {entry.name!r} is registered twice")
    _ENTRIES[entry.name] = entry
    return entry


def entries() -> list:
    """Every registered op, in registration order (importing fastft.ops registers them all)."""
    import fastft.ops  # noqa: F401  (the op modules register themselves on import)

    return list(_ENTRIES.values())


def get(name: str) -> OpEntry:
    entries()
    if name not in _ENTRIES:
        raise KeyError(f"no registered op {name!r}; registered: {sorted(_ENTRIES)}")
    return _ENTRIES[name]


def float_like(t, dtype: torch.dtype):
    """``t`` (a tensor or a nested tuple/list/dict of them) with floating tensors cast to ``dtype`` as new
    leaves (requires_grad kept); others unchanged. For truths and tests."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            return t
        return t.detach().to(dtype).requires_grad_(t.requires_grad)
    if isinstance(t, (tuple, list)):
        return type(t)(float_like(x, dtype) for x in t)
    if isinstance(t, dict):
        return {k: float_like(v, dtype) for k, v in t.items()}
    return t


def masked_reduction(per_token, mask, reduction: str):
    """fastft's token reductions in plain torch, for truths: mask zeroes tokens, "mean" over counted ones."""
    if mask is not None:
        per_token = per_token * (mask != 0).to(per_token.dtype)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (per_token.numel() if mask is None else (mask != 0).sum())
