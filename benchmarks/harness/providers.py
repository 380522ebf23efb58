"""What a benchmark declares: its providers (one implementation each, and the shared peers: Liger, fastft on
one backend), the Benchmark itself, and the measuring options."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .check import sample_rows, step_outputs


@dataclass
class Provider:
    """One implementation of the op. ``setup() -> state``; ``step(state)`` is the timed unit of work
    and returns what is compared across providers (a tensor, or a dict/tuple of tensors). A step
    must leave ``state`` as it found it (e.g. set ``.grad = None`` after reading it) so memory and
    time do not drift between steps. ``check_step(state)``, when given, is what the outputs are compared
    with instead of ``step``: the same work made deterministic (dropout off), for a step that draws random
    masks which differ between providers."""

    name: str
    setup: Callable[[], Any]
    step: Callable[[Any], Any]
    available: Optional[Callable[[], tuple[bool, str]]] = None
    check_step: Optional[Callable[[Any], Any]] = None

    def checked_outputs(self, state, out=None) -> dict:
        """Sampled outputs to compare: of ``check_step``, else of ``out`` (a step's result) or a new step."""
        if self.check_step is not None:
            out = self.check_step(state)
        elif out is None:
            out = self.step(state)
        return {k: sample_rows(v) for k, v in step_outputs(out).items()}

    def is_available(self) -> tuple[bool, str]:
        if self.available is None:
            return True, ""
        try:
            ok, why = self.available()
            return bool(ok), str(why)
        except Exception as exc:  # a probe that raises means "not usable here", with why
            return False, f"{type(exc).__name__}: {exc}"


def unavailable(name: str, reason: str) -> Provider:
    """A provider listed in the table as unavailable, with the reason."""

    def _never(*_):
        raise RuntimeError(reason)

    return Provider(name, _never, _never, lambda: (False, reason))


def liger_provider(device: str, attr: str, setup: Callable, step: Callable, note: str = "") -> Provider:
    """Liger-Kernel's ``liger_kernel.transformers.<attr>`` (a loss class, the functional module, or a
    model patcher such as ``apply_liger_kernel_to_llama``) as a peer, on CUDA only (its Triton kernels
    under the CPU interpreter are no speed peer). ``setup(obj)`` builds the state from it; ``step(state)``
    runs it as Liger documents."""
    if device != "cuda":
        return unavailable("liger", "Liger-Kernel: CUDA only - its Triton kernels under the CPU interpreter are "
                           "no speed peer")

    def load():
        import liger_kernel.transformers as lt

        return getattr(lt, attr)

    def available():
        import liger_kernel

        load()
        version = getattr(liger_kernel, "__version__", "")
        return True, " ".join(part for part in ("liger_kernel", version, attr, note) if part)

    return Provider("liger", lambda: setup(load()), step, available)


def torch_compile_provider(cfg: dict, inputs: Callable[[], dict], target: Callable[[dict], Callable],
                           step: Callable[[dict], Any]) -> Provider:
    """``torch-compile``: ``target(state)`` (the eager function or module) under torch.compile(fullgraph=True,
    dynamic=False, mode=cfg's "compile_mode"), kept as ``state["compiled"]`` for ``step(state)`` to run. It is
    compiled once per process, forward and backward (AOTAutograd) on the first call, which the harness times
    as the "1st call" and keeps out of the timed steps."""

    def setup():
        import torch

        st = inputs()
        st["compiled"] = torch.compile(target(st), fullgraph=True, dynamic=False, mode=cfg.get("compile_mode"))
        return st

    return Provider("torch-compile", setup, step)


def fastft_backend_provider(device: str, backend: str, setup: Callable, step: Callable, available: Callable,
                            check_step: Optional[Callable] = None) -> Provider:
    """fastft on one of its backends ("cpp" or "triton") as the provider ``fastft-<backend>``: ``step`` (and
    ``check_step``) run under ``fastft.backend.use(backend)``. Listed as unavailable, with why, where that backend
    is no speed peer: Triton on CPU (the interpreter), the C++ backend on CUDA, the CUDA extension on CPU. Shared so that a bench_<op>.py
    states only its inputs and its step, not this wrapping and these rules again."""
    name = f"fastft-{backend}"
    if backend == "triton" and device == "cpu":
        return unavailable(name, "Triton on CPU runs only under the interpreter: correct, but no speed peer")
    if backend == "cpp" and device != "cpu":
        return unavailable(name, "C++ backend takes CPU tensors only")
    if backend == "cuda" and device != "cuda":
        return unavailable(name, "CUDA only")
    import fastft.backend

    def on_backend(fn):
        def run_on_backend(state):
            with fastft.backend.use(backend):
                return fn(state)

        return run_on_backend

    return Provider(name, setup, on_backend(step), available,
                    check_step=None if check_step is None else on_backend(check_step))


@dataclass
class Benchmark:
    op: str
    device: str
    config: dict
    providers: list[Provider]
    description: str  # the shape and what one step is, for titles
    reference: str  # every provider's outputs are checked against this one's
    baselines: tuple[str, ...] = ()  # one "vs <name>" ratio column each
    bytes_per_step: Optional[int] = None  # explicit byte count -> GB/s
    flops_per_step: Optional[int] = None  # explicit flop count -> TFLOP/s
    tokens_per_step: Optional[int] = None  # tokens a training step processes -> tokens/s
    # output name (or "*") -> (atol, rtol); pass when max|out - ref| <= atol + rtol * max|ref|
    tolerances: dict = field(default_factory=lambda: {"*": (1e-5, 1e-4)})
    notes: list = field(default_factory=list)
    # how the compared outputs differ from the timed step's, e.g. "dropout off" (see Provider.check_step)
    check_note: str = ""


@dataclass
class Options:
    warmup: int = 3
    repeats: int = 15
    mem_steps: int = 2
    max_time_s: float = 60.0  # stop timing a provider after this long (at least 3 repeats)
    timeout_s: float = 900.0  # per provider subprocess
    memory: bool = True
    inprocess: bool = False


def op_benchmark(op: str, cfg: dict, providers: list, description: str, **fields) -> Benchmark:
    """The Benchmark of one op as every bench_<op>.py states it: checked against and compared with torch eager,
    and with torch.compile of the same code. ``fields``: the rest of Benchmark's (byte/flop counts,
    tolerances, notes)."""
    return Benchmark(op=op, device=cfg["device"], config=cfg, providers=providers, description=description,
                     reference="torch-eager", baselines=("torch-eager", "torch-compile"), **fields)


def low_precision(dtype) -> bool:
    """bf16 / fp16: the outputs are rounded to the dtype, so the tolerances are a few ulps of it."""
    import torch

    return dtype in (torch.bfloat16, torch.float16)
