"""Backends: what each one is, whether it runs here, which kernels it binds, and which one an op runs.

The four backends are named after the source of their kernels:
  "reference"  fastft/reference (pure torch, every device, every float dtype; the fallback of every op)
  "cpp"        csrc/cpu, the C++ kernels of the extension fastft._C, for CPU tensors
  "cuda"       csrc/cuda, the CUDA kernels of fastft._C, for CUDA tensors (same schemas as "cpp": csrc/schemas.cpp)
  "triton"     kernels/ (fastft.kernels), for CUDA tensors, or CPU ones under TRITON_INTERPRET=1

Everything about choosing lives here (fastft.ops._define builds the ops on top of it). Order of precedence:
``fastft.backend.use(name)`` (a context manager / setter, for tests and benchmarks) > the ``FASTFT_BACKEND``
environment variable > the op's default for the tensor's device (CUDA → Triton, CPU → C++; ``prefer`` changes
it per op). Each op picks among the backends IT has (``select_backend``): a forced backend the op has but
cannot run raises; one it lacks falls back, for that op only, to its default with a one-time warning; a
default that is unusable falls back to the pure-torch reference with a one-time warning.

Each op's ``Backend`` owns its kernel set: a binder run once, on first use (``Backend.kernels``). The
compiled backends bind ``torch.ops.fastft.*`` through ``Backend.extension_kernel``, which checks the kernel
exists for the backend's device, so availability is checked on the very names the op calls.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOW_AND_FP32 = (torch.float32, torch.float16, torch.bfloat16)

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
    if not torch.cuda.is_available():
        return False, "built with CUDA, but torch sees no GPU"
    return True, "CUDA kernels compiled into fastft._C"


def triton_status() -> tuple[bool, str]:
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


# ----------------------------------------------------------------------------------------------
# One backend of one op, and its kernel set
# ----------------------------------------------------------------------------------------------

_DEFAULT_DTYPES = {"reference": FLOAT_DTYPES, "cpp": FLOAT_DTYPES, "triton": LOW_AND_FP32, "cuda": LOW_AND_FP32}
_DISPATCH_KEY = {"cpp": "CPU", "cuda": "CUDA"}


class KernelMissing(RuntimeError):
    """The extension has no kernel of this name for this backend's device."""


def _has_kernel(kernel: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastft::{kernel}", key)
    except RuntimeError:  # no such operator
        return False


class Backend:
    """One backend of one op.

    name     one of BACKENDS.
    kernels  the binder of its kernel set: ``(backend) -> object`` whose attributes are the op's kernels on
             this backend (``extension_kernels`` / ``triton_kernels`` build the usual ones), run once on first
             use. None for the reference (it runs the op's reference function).
    dtypes   the input dtypes it computes; a call in another dtype (fp64 on Triton/CUDA) runs the reference
             instead, so fp64 stays exact. Default: all four floats for reference and cpp, fp32/fp16/bf16
             for triton and cuda.
    probe    an extra availability check () -> (usable, why not), e.g. an optional dependency.
    """

    def __init__(self, name: str, kernels: Optional[Callable] = None, *, dtypes: Optional[tuple] = None,
                 probe: Optional[Callable[[], tuple]] = None) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        self.name, self.bind, self.probe = name, kernels, probe
        self.dtypes = _DEFAULT_DTYPES[name] if dtypes is None else tuple(dtypes)
        self._kernels = None

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def extension_kernel(self, name: str):
        """``torch.ops.fastft.<name>``, checked to have a kernel for this backend's device (CPU for "cpp",
        CUDA for "cuda"); KernelMissing otherwise."""
        key = _DISPATCH_KEY.get(self.name)
        if key is None:
            raise ValueError(f"backend {self.name!r} calls no extension kernel")
        if not _has_kernel(name, key):
            raise KernelMissing(f"fastft._C has no {key} kernel for fastft::{name}")
        return getattr(torch.ops.fastft, name)

    @property
    def kernels(self):
        """The kernel set, bound on first use."""
        if self._kernels is None:
            if self.bind is None:
                raise RuntimeError(f"backend {self.name!r} of this op declares no kernels")
            self._kernels = self.bind(self)
        return self._kernels

    def status(self) -> tuple:
        """(usable, reason): the backend's own probe (``status``), then (compiled backends) binding its
        kernels, then ``probe``."""
        ok, why = status(self.name)
        if not ok:
            return ok, why
        if self.name in _DISPATCH_KEY and self.bind is not None:
            try:
                self.kernels
            except KernelMissing as exc:
                return False, str(exc)
        if self.probe is not None:
            return self.probe()
        return ok, why


def extension_kernels(**roles: str) -> Callable:
    """A binder for the compiled backends: each role bound to ``torch.ops.fastft.<schema>``, e.g.
    ``extension_kernels(fwd="rms_norm_fwd_kernel", bwd="rms_norm_bwd_kernel")``. One binder serves "cpp"
    and "cuda": the dispatcher routes CPU tensors to csrc/cpu and CUDA tensors to csrc/cuda."""
    return lambda backend: SimpleNamespace(**{role: backend.extension_kernel(k) for role, k in roles.items()})


def triton_kernels(module: str, **roles: str) -> Callable:
    """A binder for "triton": each role bound to a launcher of ``fastft.kernels.<module>`` (imported on first
    use, so importing fastft does not import triton)."""
    def bind(backend):
        mod = importlib.import_module(f"{__package__}.kernels.{module}")
        return SimpleNamespace(**{role: getattr(mod, fn) for role, fn in roles.items()})

    return bind


def standard_backends(compiled: Optional[Callable], triton: Optional[Callable]) -> tuple:
    """reference, cpp, triton and cuda, where cpp and cuda share the ``compiled`` binder (the same
    torch.ops.fastft schemas) and triton has its own."""
    return (Backend("reference"), Backend("cpp", compiled), Backend("triton", triton), Backend("cuda", compiled))


# ----------------------------------------------------------------------------------------------
# Which backend an op runs
# ----------------------------------------------------------------------------------------------

_OP_BACKENDS: dict = {}  # op name -> {backend name: Backend}, for select_backend (which takes only constants)
_choices: dict = {}  # (op, device type, forced) -> backend name
_warned: set = set()


def register_op(op_name: str, backends: dict) -> None:
    """Make ``op_name``'s backends known to ``select_backend`` (fastft.ops._define does it for every op)."""
    if op_name in _OP_BACKENDS:
        raise ValueError(f"op {op_name!r} is defined twice")
    _OP_BACKENDS[op_name] = backends


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=7)  # the caller of the public functional


# torch.compile evaluates this eagerly while tracing and keeps the answer as a graph constant. Every input
# that can change it is an argument: the forced name comes from forced(), which the tracer reads (and guards
# on), so `with fastft.backend.use(...)` after a compile recompiles instead of silently keeping the old choice.
@torch.compiler.assume_constant_result
def select_backend(op_name: str, device_type: str, forced_name: Optional[str]) -> str:
    """The backend ``op_name`` runs on ``device_type`` tensors.

    Rule: a forced backend (``use`` > ``FASTFT_BACKEND``) that the op has is used, and raises if it cannot
    run here; one the op does not have falls back, for this op only, to the default with a one-time
    warning (so ``FASTFT_BACKEND=cuda`` does not break ops without CUDA kernels). Default: the op's
    ``preferred`` order for the device (CUDA tensors -> triton, else cuda; CPU tensors -> cpp); else (or
    when none is usable) the reference, with a one-time warning.
    """
    key = (op_name, device_type, forced_name)
    if key not in _choices:  # probes are per process; a raise is not cached
        _choices[key] = _select(op_name, _OP_BACKENDS[op_name], device_type, forced_name)
    return _choices[key]


def _select(op_name: str, backends: dict, device_type: str, forced_name: Optional[str]) -> str:
    if forced_name is not None:
        if forced_name in backends:
            check_device(forced_name, device_type)
            ok, why = backends[forced_name].status()
            if not ok:
                raise RuntimeError(f"fastft backend {forced_name!r} was requested for {op_name} but is unusable: {why}")
            return forced_name
        _warn_once((op_name, forced_name), f"fastft: {op_name} has no {forced_name!r} backend (it has "
                                           f"{tuple(backends)}); using its default backend for this op")
    order = preferred(op_name, device_type)
    for name in order:
        if name in backends and backends[name].status()[0]:
            return name
    reasons = "; ".join(f"{n}: {backends[n].status()[1]}" for n in order if n in backends)
    _warn_once((op_name, device_type), f"fastft: no compiled backend of {op_name} is usable for {device_type} tensors "
                                       f"({reasons or 'none declared'}); falling back to the pure-torch reference "
                                       "(slower). `python -m fastft info` says more.")
    return "reference"
