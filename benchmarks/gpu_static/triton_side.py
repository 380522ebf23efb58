"""Triton kernels compiled ahead of time for a GPU this machine does not have.

The launch configurations are not copied here: each scenario below calls a real launcher of fastft.kernels
(the function fastft.ops calls) on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and strides, no
storage), at the GPU benchmark shapes, so the launcher picks its block sizes, warps, stages and constexpr flags
exactly as on a GPU. ``JITFunction.run`` is swapped for a recorder while it runs; each recorded launch is then
compiled with Triton's own compiler for a ``GPUTarget`` (sm_90, sm_80), its arguments specialised as the JIT
specialises them for torch tensors (pointers 16-byte aligned, integers divisible by 16 marked, an integer
equal to 1 made a constant), and the cubin's registers, shared and local memory are read with cuobjdump.
Must run with TRITON_INTERPRET unset (``python -m benchmarks.gpu_static`` removes it before importing triton).
"""
import contextlib
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["SCENARIOS", "KernelBuild", "Launch", "all_kernel_names", "capture_launches", "compile_launches",
           "cuobjdump_path", "read_resources", "read_sass"]

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_DTYPE_NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32", torch.int64: "i64", torch.int32: "i32",
                torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8"}


@dataclass(frozen=True)
class Scenario:
    op: str
    label: str                              # the call, e.g. "fwd+grad V=32001 bf16"
    call: Callable[[Callable], object]      # call(fake) runs launchers; fake(shape, dtype) makes a fake CUDA tensor


@dataclass
class Launch:
    scenario: Scenario
    module: str
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, int]
    calls: List[str] = field(default_factory=list)   # the scenario labels that compile to this same binary

    def __post_init__(self):
        if not self.calls:
            self.calls.append(self.scenario.label)

    @property
    def config(self) -> str:
        blocks = [f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK") or k == "GROUP_M"]
        flags = [k for k, v in self.constexprs.items() if v is True and not k.startswith("BF16_RNE")]
        warps = self.options.get("num_warps", 4)
        stages = self.options.get("num_stages", 3)
        return " ".join(blocks + [f"w{warps}", f"s{stages}"] + flags)

    @property
    def threads(self) -> int:
        return 32 * self.options.get("num_warps", 4)


@dataclass
class KernelBuild:
    launch: Launch
    arch: str
    regs: int = 0
    smem: int = 0          # static (cubin) + dynamic (Triton's metadata) shared memory per CTA, bytes
    local: int = 0         # stack frame + local memory per thread (spills, local arrays), bytes
    sass: str = ""
    error: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# The production calls, at the GPU benchmark shapes (benchmarks/bench_*.py, device "cuda")
# ------------------------------------------------------------------------------------------------

def _scalar(fake):
    return fake((), FP32)


def _ce_fwd(v, dtype, grad=True, smoothing=0.0, z_loss=0.0, softcap=0.0, n=8192):
    def call(fake):
        from fastft.kernels.cross_entropy import cross_entropy_fwd
        return cross_entropy_fwd(fake((n, v), dtype), fake((n,), torch.int64), None,
                                 _scalar(fake) if grad else None, -100, smoothing, z_loss, softcap)
    return call


def _ce_bwd(v, dtype, n=8192):
    def call(fake):
        from fastft.kernels.cross_entropy import cross_entropy_bwd
        return cross_entropy_bwd(fake((n,), FP32), fake((n, v), dtype), fake((n,), torch.int64), None,
                                 fake((n,), FP32), -100, 0.0, 0.0, 0.0)
    return call


def _ce_scale(dtype, n=8192, v=128256):
    def call(fake):
        from fastft.kernels.cross_entropy import scale_if_not_one_
        return scale_if_not_one_(fake((n, v), dtype), _scalar(fake))
    return call


def _kl_fwd(v, dtype, n=8192):
    def call(fake):
        from fastft.kernels.kl import full_kl_fwd
        return full_kl_fwd(fake((n, v), dtype), fake((n, v), dtype), fake((n,), torch.bool), _scalar(fake),
                           1.0, True, False)
    return call


def _kl_bwd(v, dtype, n=8192):
    def call(fake):
        from fastft.kernels.kl import full_kl_bwd
        rows = [fake((n,), FP32) for _ in range(4)]
        return full_kl_bwd(rows[0], fake((n, v), dtype), fake((n, v), dtype), fake((n,), torch.bool),
                           rows[1], rows[2], rows[3], 1.0, True, False)
    return call


def _sel_fwd_bwd(v, dtype, grad_entropy=True, n=8192):
    """The selective log-softmax (+ entropy) as linear_selective_log_softmax runs it on a logits chunk: ignore_index
    -100, the gradient written over the logits; grad_entropy=False: selective_log_softmax's log-prob-only backward."""
    def call(fake):
        from fastft.kernels.kl import selective_log_softmax_bwd, selective_log_softmax_fwd
        logits, index = fake((n, v), dtype), fake((n,), torch.int64)
        _, lse, entropy = selective_log_softmax_fwd(logits, index, 1.0, -100)
        return selective_log_softmax_bwd(fake((n,), FP32), fake((n,), FP32) if grad_entropy else None, logits, index,
                                         lse, entropy, 1.0, -100, out=logits)
    return call


def _lora(dtype, dropout_p, n=8192, h_in=4096, h_out=4096, r=16):
    def call(fake):
        from fastft.kernels.lora import lora_dropout_mask, lora_linear_bwd, lora_linear_fwd
        x, w = fake((n, h_in), dtype), fake((h_out, h_in), dtype)
        a, b = fake((r, h_in), dtype), fake((h_out, r), dtype)
        seed = fake((1,), torch.int64)
        _, u = lora_linear_fwd(x, w, None, a, b, 2.0, dropout_p, seed)
        lora_linear_bwd(fake((n, h_out), dtype), x, w, a, b, u, seed, 2.0, dropout_p, True, False, False, True, True)
        if dropout_p > 0:
            lora_dropout_mask(x, dropout_p, seed)
    return call


def _adapter(dtype, dropout_p, n=16384, r=64):
    def call(fake):
        from fastft.kernels.dropout import drop_threshold
        from fastft.kernels.adapter import adapter_act_dropout_bwd, adapter_act_dropout_fwd
        pre, seed = fake((n, r), dtype), fake((1,), torch.int64)
        threshold = drop_threshold(dropout_p)
        adapter_act_dropout_fwd(pre, seed, 0, threshold, True)
        return adapter_act_dropout_bwd(fake((n, r), dtype), pre, seed, 0, threshold, 1.0, True, False)
    return call


def _rms_norm(dtype, n=16384, h=4096):
    def call(fake):
        from fastft.kernels.rms_norm import rms_norm_bwd, rms_norm_fwd
        x, w = fake((n, h), dtype), fake((h,), dtype)
        _, rstd = rms_norm_fwd(x, w, 1e-6, 0.0, False, dtype)
        return rms_norm_bwd(fake((n, h), dtype), x, w, rstd, 0.0, False, True, True)
    return call


def _swiglu(dtype, n=16384, i=14336):
    def call(fake):
        from fastft.kernels.swiglu import swiglu_bwd, swiglu_fwd
        gate, up = fake((n, i), dtype), fake((n, i), dtype)
        swiglu_fwd(gate, up)
        return swiglu_bwd(fake((n, i), dtype), gate, up, True, True)
    return call


def _scenarios() -> List[Scenario]:
    s = []
    for v in (32000, 32001, 128256):       # Llama-2 vocabulary, an odd one (unaligned rows), Llama-3
        for dtype in (BF16, FP16, FP32):
            s.append(Scenario("cross_entropy", f"fwd+grad V={v} {_DTYPE_NAMES[dtype]}", _ce_fwd(v, dtype)))
    for v in (32001, 128256):
        s.append(Scenario("cross_entropy", f"fwd (no grad) V={v} bf16", _ce_fwd(v, BF16, grad=False)))
        s.append(Scenario("cross_entropy", f"bwd V={v} bf16", _ce_bwd(v, BF16)))
    s.append(Scenario("cross_entropy", "fwd+grad smoothing+z_loss+softcap V=128256 bf16",
                      _ce_fwd(128256, BF16, smoothing=0.1, z_loss=1e-4, softcap=30.0)))
    for dtype in (BF16, FP32):
        s.append(Scenario("cross_entropy", f"grad scale {_DTYPE_NAMES[dtype]}", _ce_scale(dtype)))
    for v in (32000, 128256):
        s.append(Scenario("full_kl", f"fwd+grad V={v} bf16", _kl_fwd(v, BF16)))
    s.append(Scenario("full_kl", "fwd+grad V=128256 fp32", _kl_fwd(128256, FP32)))
    s.append(Scenario("full_kl", "bwd V=128256 bf16", _kl_bwd(128256, BF16)))
    for v in (32001, 128256):
        s.append(Scenario("selective_log_softmax", f"fwd+bwd (logp, entropy) V={v} bf16", _sel_fwd_bwd(v, BF16)))
    s.append(Scenario("selective_log_softmax", "fwd+bwd (logp only) V=128256 bf16", _sel_fwd_bwd(128256, BF16, False)))
    for dtype in (BF16, FP32):
        s.append(Scenario("lora_linear", f"fwd+bwd 8192x4096->4096 r=16 {_DTYPE_NAMES[dtype]}", _lora(dtype, 0.0)))
    s.append(Scenario("lora_linear", "fwd+bwd dropout 0.1 bf16", _lora(BF16, 0.1)))
    for dtype in (BF16, FP32):
        s.append(Scenario("adapter", f"fwd+bwd N=16384 r=64 dropout 0.1 {_DTYPE_NAMES[dtype]}", _adapter(dtype, 0.1)))
    for dtype in (BF16, FP32):
        s.append(Scenario("rms_norm", f"fwd+bwd 16384x4096 {_DTYPE_NAMES[dtype]}", _rms_norm(dtype)))
    for dtype in (BF16, FP32):
        s.append(Scenario("swiglu", f"fwd+bwd 16384x14336 {_DTYPE_NAMES[dtype]}", _swiglu(dtype)))
    return s


SCENARIOS = _scenarios()


# ------------------------------------------------------------------------------------------------
# Capture: run the launchers on fake CUDA tensors with the JIT's run swapped for a recorder
# ------------------------------------------------------------------------------------------------

def _specialise(fn, args, kwargs) -> Tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for one launch, as the JIT would build them for torch tensors."""
    names = [p.name for p in fn.params]
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for p in fn.params:
        value = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _DTYPE_NAMES[value.dtype]
            attrs[(p.num,)] = aligned  # torch's allocations are 256-byte aligned; the JIT checks data_ptr % 16
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not p.do_not_specialize:
                signature[p.name], constexprs[p.name] = "constexpr", 1
            else:
                signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0 and not p.do_not_specialize:
                    attrs[(p.num,)] = aligned
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        elif value is None:
            signature[p.name], constexprs[p.name] = "constexpr", None
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value).__name__} is not handled")
    return signature, constexprs, attrs, options


def _public_launcher() -> str:
    """The public fastft.kernels function on the stack (e.g. lora_linear_bwd): which call made a launch."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("fastft.kernels") and not frame.f_code.co_name.startswith("_"):
            return frame.f_code.co_name
        frame = frame.f_back
    return "?"


@contextlib.contextmanager
def _fake_cuda(sms: int):
    """torch.cuda calls the launchers make (device guard, SM count) answered without a device."""
    props = types.SimpleNamespace(multi_processor_count=sms, major=9, minor=0, name="fake")
    saved = (torch.cuda.device, torch.cuda.get_device_properties, torch.cuda.current_device)
    torch.cuda.device = lambda *_: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *_: props
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.device, torch.cuda.get_device_properties, torch.cuda.current_device = saved


def capture_launches(scenarios=None, sms: int = 132) -> Tuple[List[Launch], List[Tuple[Scenario, str]]]:
    """Every Triton launch the scenarios make, and the scenarios that failed (with the error)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    launches, failures = [], []
    current: List[Scenario] = []

    def record(self, *args, grid, warmup, **kwargs):
        sig, const, attrs, opts = _specialise(self, args, kwargs)
        launch = Launch(current[0], self.fn.__module__, self.fn.__name__, sig, const, attrs, opts)
        launch.calls[:] = [f"{_public_launcher()}: {current[0].label}"]
        launches.append(launch)

    original_run = JITFunction.run
    JITFunction.run = record
    try:
        with _fake_cuda(sms):
            for scenario in scenarios if scenarios is not None else SCENARIOS:
                current[:] = [scenario]
                try:
                    with FakeTensorMode():
                        scenario.call(lambda shape, dtype: torch.empty(shape, dtype=dtype, device="cuda"))
                except Exception as exc:  # a launcher whose signature moved: a FAIL row, not a crash
                    failures.append((scenario, f"{type(exc).__name__}: {exc}"))
    finally:
        JITFunction.run = original_run
    return launches, failures


def all_kernel_names() -> Dict[str, str]:
    """{kernel name: module} for every @triton.jit function of fastft.kernels named *_kernel (the launched ones;
    the other jit functions are device helpers inlined into them)."""
    import fastft.kernels as pkg
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__ and name.endswith("_kernel"):
                found[name] = module.__name__
    return found


# ------------------------------------------------------------------------------------------------
# Compile and read the cubin
# ------------------------------------------------------------------------------------------------

def cuobjdump_path() -> Optional[str]:
    try:
        import triton.backends.nvidia as nvidia
        shipped = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
        if os.access(shipped, os.X_OK):
            return shipped
    except ImportError:
        pass
    return shutil.which("cuobjdump")


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def read_resources(cubin_path: str) -> Dict[str, Tuple[int, int, int, int]]:
    """{function: (registers, stack, static shared, local)} from ``cuobjdump -res-usage``."""
    out = subprocess.run([cuobjdump_path(), "-res-usage", cubin_path], capture_output=True, text=True, check=True)
    return {m.group(1): tuple(int(m.group(i)) for i in range(2, 6)) for m in _RES.finditer(out.stdout)}


def read_sass(cubin_path: str) -> Dict[str, str]:
    """{function: its SASS text} from ``cuobjdump -sass``."""
    out = subprocess.run([cuobjdump_path(), "-sass", cubin_path], capture_output=True, text=True, check=True)
    parts = re.split(r"\n\s*Function : (\S+)\n", out.stdout)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


_JOBS: List[Tuple[Launch, str]] = []


def _compile_one(index: int) -> dict:
    """The resource fields of a KernelBuild for job ``index`` (a dict: it crosses a process boundary)."""
    launch, arch = _JOBS[index]
    build = {}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(launch.module), launch.kernel)
        capability = int(arch.split("_")[1])
        compiled = triton.compile(ASTSource(fn, launch.signature, launch.constexprs, launch.attrs),
                                  target=GPUTarget("cuda", capability, 32), options=dict(launch.options))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            regs, stack, shared, local = read_resources(path)[launch.kernel]
            build["sass"] = read_sass(path).get(launch.kernel, "")
        # Spilled registers live in the stack frame (STACK) or in local memory (LOCAL): either is DRAM traffic.
        build.update(regs=regs, local=local + stack, smem=shared + int(compiled.metadata.shared))
    except Exception as exc:  # reported as a FAIL row (cannot compile = cannot launch)
        build["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return build


def compile_launches(launches: List[Launch], archs, workers: int = 2) -> List[KernelBuild]:
    """Each distinct launch compiled for each arch (Triton's cache makes a rerun of unchanged kernels fast)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_launches: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    by_key: Dict[str, Launch] = {}
    for launch in launches:
        key = repr((launch.module, launch.kernel, sorted(launch.signature.items()),
                    sorted(launch.constexprs.items(), key=str), sorted(launch.attrs.items()),
                    sorted(launch.options.items())))
        if key in by_key:  # the same binary: one row naming every production call that launches it
            by_key[key].calls.extend(launch.calls)
        else:
            by_key[key] = launch
    unique = list(by_key.values())
    _JOBS[:] = [(launch, arch) for arch in archs for launch in unique]
    if workers <= 1:
        results = [_compile_one(i) for i in range(len(_JOBS))]
    else:
        import multiprocessing
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_one, range(len(_JOBS))))
    return [KernelBuild(launch, arch, **fields) for (launch, arch), fields in zip(_JOBS, results)]
