"""Backend selection shared by every op.

Order of precedence: ``fastft.backend.use(name)`` (a context manager / setter, for tests and
benchmarks) > the ``FASTFT_BACKEND`` environment variable > the default for the tensor's device
(CUDA → Triton, CPU → C++). A backend that is requested but unusable raises; a default that is
unusable falls back to the pure-torch reference with a one-time warning.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Iterator

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")

# A process-wide override (plain globals, not thread-locals, so torch.compile traces select()).
_override: list[str | None] = [None]
_warned: set[str] = set()
_status_cache: dict[str, tuple[bool, str]] = {}


def _forced() -> str | None:
    name = _override[0] or os.environ.get("FASTFT_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown fastft backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use(name: str | None) -> Iterator[None]:
    """Force one backend inside a ``with`` block (``None`` restores automatic choice)."""
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


# Evaluated eagerly while torch.compile traces; the chosen name is a constant of the graph.
@torch.compiler.assume_constant_result
def select(device_type: str, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend for a call on tensors of ``device_type``; ``supported`` lists what the op has."""
    forced = _forced()
    if forced is not None:
        if forced not in supported:
            raise ValueError(f"backend {forced!r} is not implemented for this op (it has {supported})")
        if forced == "cpp" and device_type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device_type}")
        if forced == "cuda" and device_type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device_type}")
        if forced == "triton" and device_type not in ("cuda", "cpu"):
            raise ValueError(f"backend 'triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got {device_type}")
        ok, why = status(forced)
        if not ok:
            raise RuntimeError(f"fastft backend {forced!r} was requested but is unusable: {why}")
        return forced
    preferred = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}.get(device_type, ())
    for name in preferred:
        if name in supported and status(name)[0]:
            return name
    key = f"{device_type}:{supported}"
    if key not in _warned:
        _warned.add(key)
        reasons = "; ".join(f"{n}: {status(n)[1]}" for n in preferred if n in supported) or "no compiled backend"
        warnings.warn(
            f"fastft: no compiled backend usable for {device_type} tensors ({reasons}); "
            "falling back to the pure-torch reference (slower). `python -m fastft info` says more.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def debug_checks() -> bool:
    """Full (host-syncing) input checks on CUDA tensors; always on for CPU tensors."""
    return os.environ.get("FASTFT_DEBUG", "0") == "1"
