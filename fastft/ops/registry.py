"""Every public op, registered once, next to its definition (the bottom of fastft/ops/defs/<op>.py).

Read by ``python -m fastft info`` (backends and whether each is usable here), by ``benchmarks/run_ops.py`` (which
``benchmarks/bench_<name>.py`` covers the op) and by the generic tests (tests/ops/test_ops_generic.py, whose
samples, truths and bad inputs live in tests/ops/op_db.py). An entry holds only what the library needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ._define import Op

__all__ = ["OpEntry", "entries", "get", "register"]


@dataclass(frozen=True)
class OpEntry:
    """name        the public name (fastft.ops.<name>).
    functional     the public function.
    op             the defined op (fastft.ops._define.Op) whose backends it dispatches to; None for an
                   op that is plain torch (no custom op, so no opcheck and only the reference backend).
    benchmark      the benchmarks/bench_<benchmark>.py module that measures it, or None.
    """

    name: str
    functional: Callable
    op: Optional[Op]
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
