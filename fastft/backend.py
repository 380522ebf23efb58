"""Backend selection shared by every op.

Order of precedence: ``fastft.backend.use(name)`` (a context manager / setter, for tests and
benchmarks) > the ``FASTFT_BACKEND`` environment variable > the default for the tensor's device
(CUDA → Triton, CPU → C++). Each op picks among the backends IT has (fastft.ops._define.select_backend):
a forced backend the op has but cannot run raises; one it lacks falls back, for that op only, to its
default with a one-time warning; a default that is unusable falls back to the pure-torch reference with
a one-time warning.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator

BACKENDS = ("reference", "cpp", "triton", "cuda")

# A process-wide override (a plain global, not a thread-local: torch.compile reads it through forced()
# and guards on its value).
_override: list[str | None] = [None]
_status_cache: dict[str, tuple[bool, str]] = {}


def _forced() -> str | None:
    name = _override[0] or os.environ.get("FASTFT_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown fastft backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use(name: str | None) -> Iterator[None]:
    """Force one backend inside a ``with`` block (``None`` restores automatic choice). The setting is
    process-wide (torch.compile guards on it), so it is not for threads that overlap: blocks entered
    and left out of order by several threads restore each other's settings."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown fastft backend {name!r}; expected one of {BACKENDS}")
    previous = _override[0]
    _override[0] = name
    try:
        yield
    finally:
        _override[0] = previous


# ----------------------------------------------------------------------------------------------
# Availability probes. Each returns (usable, reason); the reason is what `fastft info` prints.
# ----------------------------------------------------------------------------------------------


_extension: list = []  # [module or None, error message], filled on first use


def _load_extension() -> list:
    if not _extension:
        try:
            _extension[:] = [importlib.import_module("fastft._C"), ""]
        except ImportError as exc:
            _extension[:] = [None, f"fastft._C not importable ({exc}); build it with `make build` or `pip install .`"]
    return _extension


def extension():
    """The compiled ``fastft._C`` module, or None when it was not built."""
    return _load_extension()[0]


def extension_error() -> str:
    return _load_extension()[1]


def cpp_status() -> tuple[bool, str]:
    if extension() is None:
        return False, extension_error()
    return True, "C++ extension fastft._C loaded"


def cuda_ext_status() -> tuple[bool, str]:
    ext = extension()
    if ext is None:
        return False, extension_error()
    if not getattr(ext, "with_cuda", False):
        return False, "fastft._C was built without CUDA (set FASTFT_BUILD_CUDA=1 on a machine with nvcc)"
    import torch

    if not torch.cuda.is_available():
        return False, "built with CUDA, but torch sees no GPU"
    return True, "CUDA kernels compiled into fastft._C"


def triton_status() -> tuple[bool, str]:
    import torch

    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton not importable ({exc})"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU interpreter: correct, slow)"
    return False, "no GPU; set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter"


def status(name: str) -> tuple[bool, str]:
    """(usable, reason) for a backend; probed once per process."""
    if name not in _status_cache:
        probes = {"reference": lambda: (True, "pure torch"), "cpp": cpp_status, "cuda": cuda_ext_status,
                  "triton": triton_status}
        if name not in probes:
            raise ValueError(f"unknown fastft backend {name!r}; expected one of {BACKENDS}")
        _status_cache[name] = probes[name]()
    return _status_cache[name]


# Default order per device type: the first usable backend an op has wins (else the reference).
PREFERRED = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}
# Per-op orders that replace PREFERRED for one op and device type (``prefer``), each set by the op's module with
# its reason in the op's backend status (what `fastft info` prints), e.g. lora_linear's byte/flop plan.
_OP_PREFERRED: dict = {}  # (op name, device type) -> (backend order, why)


def prefer(op_name: str, device_type: str, order: tuple, why: str) -> None:
    """Make ``order`` (first usable wins; repeats ignored) the default of ``op_name`` on ``device_type`` tensors,
    for the reason ``why`` (printed by `fastft info`)."""
    _OP_PREFERRED[(op_name, device_type)] = (tuple(dict.fromkeys(order)), why)


def preference_notes(op_name: str) -> list:
    """[(device type, order, why)] of the per-op defaults set with ``prefer``."""
    return [(dev, order, why) for (op, dev), (order, why) in _OP_PREFERRED.items() if op == op_name]


def preferred(op_name: str, device_type: str) -> tuple:
    """The default backend order of ``op_name`` on ``device_type`` tensors."""
    entry = _OP_PREFERRED.get((op_name, device_type))
    return entry[0] if entry else PREFERRED.get(device_type, ())


_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "reference": None}


def forced() -> str | None:
    """The forced backend name, or None. torch.compile traces this (it reads ``use``'s override, a global
    the compiled graph guards on), so changing ``use(...)`` after a compile recompiles. FASTFT_BACKEND is
    process configuration: set it before the first compile."""
    return _forced()


def check_device(name: str, device_type: str) -> None:
    """ValueError when backend ``name`` cannot run on tensors of ``device_type``."""
    devices = _DEVICES[name]
    if devices is not None and device_type not in devices:
        where = "CUDA (or CPU under TRITON_INTERPRET=1)" if name == "triton" else "/".join(d.upper() for d in devices)
        raise ValueError(f"backend {name!r} runs on {where} tensors, got tensors on {device_type}")


def debug_checks() -> bool:
    """Full (host-syncing) input checks on CUDA tensors; always on for CPU tensors."""
    return os.environ.get("FASTFT_DEBUG", "0") == "1"
