"""Memory and traffic plan per op at the GPU benchmark shapes, computed from what the op's code allocates.

Each op runs forward + backward on CPU tensors at a proportional, scaled-down shape under ``LiveBytes``, a
TorchDispatchMode that sees every aten (and fastft kernel) op the Python glue issues: it adds the bytes of
every new storage an op returns and subtracts them when the storage is freed (a weakref finalizer), and sums
the bytes each op reads and writes. The glue is the code the GPU runs: FASTFT_BACKEND=cpp issues the same
calls as the CUDA extension's path (both call torch.ops.fastft.*_kernel, one schema), FASTFT_BACKEND=triton
the Triton path (its kernels run under the interpreter here).

Scaling rule: every tensor's bytes are scaled by the product over its dimensions of (GPU size / scaled size),
each dimension identified by its scaled size: N (tokens, and the token rows of a chunk), V (vocabulary),
H (hidden), I (intermediate); fixed sizes (LoRA / adapter rank, 1) do not scale. So a [chunk, V] logits buffer
scales with N x V, grad_W [V, H] with V x H, grad_x [N, H] with N x H. The chunk budget
(FASTFT_LCE_CHUNK_BYTES) is scaled by the same N x V factor, so the scaled run takes as many chunks as the GPU
(512 MiB on CUDA by default). Traffic counts, per aten op, the bytes of its tensor inputs and outputs (an in-place
op reads and writes its self; views and allocations move nothing), and per fastft kernel (a Triton launch or a
torch.ops.fastft.*_kernel call) each distinct tensor argument once: a kernel that sweeps a row twice, or reads
and then overwrites a buffer, is counted once, one that returns early is counted in full. Printed as markdown on stdout.
"""
import contextlib
import inspect
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes", "OpPlan", "PLANS", "measure", "main"]

GB = 1e9
CUDA_CHUNK_BYTES = 512 << 20  # fastft's default chunk budget on CUDA (ops/_losses.py DEFAULT_CHUNK_BYTES)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created while active, above those that existed before, and bytes moved.

    ``factor(shape)`` gives each tensor's scale factor (1 for a plain measurement)."""

    def __init__(self, factor: Callable[[Tuple[int, ...]], float] = lambda shape: 1.0):
        super().__init__()
        self.factor = factor
        self.live: Dict[int, Tuple[int, float, str]] = {}  # storage key -> (bytes, scaled bytes, what)
        self.now = self.now_scaled = 0.0
        self.peak = self.peak_scaled = 0.0
        self.at_peak: List[Tuple[float, str]] = []          # (scaled bytes, what) alive at the scaled peak
        self.traffic = self.traffic_scaled = 0.0
        self.gemm_traffic_scaled = 0.0

    def _scaled(self, t: torch.Tensor) -> Tuple[int, float]:
        n = t.numel() * t.element_size()
        return n, n * self.factor(tuple(t.shape))

    def _free(self, key: int) -> None:
        size, scaled, _ = self.live.pop(key, (0, 0.0, ""))
        self.now -= size
        self.now_scaled -= scaled

    def triton_launch(self, args, kwargs) -> None:
        """Traffic of one kernel launch: each distinct tensor argument's bytes once (read or written; a
        placeholder that aliases another argument is not counted twice)."""
        seen = set()
        for t in list(args) + list(kwargs.values()):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in seen:
                seen.add(t.untyped_storage()._cdata)
                self.traffic_scaled += self._scaled(t)[1]

    @contextlib.contextmanager
    def counting_triton_launches(self):
        """Triton launches count as kernels: their tensor arguments' bytes, while the interpreter's own host
        copies (it runs the kernel on numpy copies of the arguments) are hidden from the tracker."""
        from torch.utils._python_dispatch import _disable_current_modes
        from triton.runtime import interpreter

        original = interpreter.GridExecutor.__call__
        tracker = self

        def call(executor, *args, **kwargs):
            tracker.triton_launch(args, kwargs)
            with _disable_current_modes():
                return original(executor, *args, **kwargs)

        interpreter.GridExecutor.__call__ = call
        try:
            yield
        finally:
            interpreter.GridExecutor.__call__ = original

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self._count_traffic(func, args, kwargs, outputs)
        for t in outputs:
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or storage.nbytes() == 0:
                continue
            if any(i.untyped_storage()._cdata == key for i in inputs):
                continue
            size = storage.nbytes()
            scaled = size * self.factor(tuple(t.shape)) if t.numel() * t.element_size() == size else size
            what = f"{func.__name__} {t.dtype} {list(t.shape)}".replace("torch.", "")
            self.live[key] = (size, scaled, what)
            weakref.finalize(storage, self._free, key)
            self.now += size
            self.now_scaled += scaled
            self.peak = max(self.peak, self.now)
            if self.now_scaled > self.peak_scaled:
                self.peak_scaled = self.now_scaled
                self.at_peak = sorted(((s, w) for _, s, w in self.live.values()), reverse=True)
        return out

    def _count_traffic(self, func, args, kwargs, outputs) -> None:
        schema = func._schema
        rets = schema.returns
        if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
            return  # a view
        name = schema.name.split("::")[-1]
        if name.startswith(("empty", "new_empty")) or name in ("_local_scalar_dense", "detach", "alias", "lift_fresh"):
            return
        if schema.name.startswith("fastft::"):
            # A fastft kernel (C++ here, CUDA on a GPU): counted as a Triton launch is, each distinct tensor once.
            self.triton_launch(list(args) + list(kwargs.values()) + outputs, {})
            return
        moved = 0.0
        written_keys = set()
        for arg_schema, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                    schema.arguments[len(args):]]):
            if not isinstance(value, torch.Tensor):
                continue
            _, scaled = self._scaled(value)
            mutated = arg_schema.alias_info is not None and arg_schema.alias_info.is_write
            if mutated:
                written_keys.add(value.untyped_storage()._cdata)
                moved += scaled * (2 if schema.overload_name != "out" and name.endswith("_") else 1)
            else:
                moved += scaled
        for t in outputs:
            if t.untyped_storage()._cdata not in written_keys:
                moved += self._scaled(t)[1]
        self.traffic_scaled += moved
        if name in ("mm", "addmm", "addmm_", "bmm", "matmul", "linear", "baddbmm"):
            self.gemm_traffic_scaled += moved


# ------------------------------------------------------------------------------------------------
# The ops at their GPU benchmark shapes (benchmarks/bench_*.py, device "cuda"), bf16
# ------------------------------------------------------------------------------------------------

@dataclass
class OpPlan:
    op: str
    gpu: Dict[str, int]                     # GPU benchmark dims, e.g. {"N": 8192, "V": 128256}
    scaled: Dict[str, int]                  # the dims run here (distinct values, so a size names its dim)
    run: Callable[[Dict[str, int], torch.dtype], None]   # builds inputs and runs forward + backward
    minimum_memory: Callable[[Dict[str, int]], Tuple[float, str]]   # (bytes, what the math must hold)
    minimum_traffic: Callable[[Dict[str, int]], Tuple[float, str]]  # (bytes, what it must read + write)
    chunked: bool = False                   # token rows of a chunk appear as extra dims (scaled like N)
    fixed: Tuple[int, ...] = (1,)
    note: str = ""
    options: Dict[str, object] = field(default_factory=dict)


B2 = 2  # bytes per bf16 element


def _make(run_inputs):
    def run(d, dtype, **options):
        inputs, step = run_inputs(d, dtype)
        return inputs, lambda: step(**options)
    return run


def _ce(d, dtype, **options):
    from fastft.ops import cross_entropy
    # The logits are a non-leaf, as a model's head output is (in-place gradients refuse a leaf the user holds).
    logits = torch.randn(d["N"], d["V"], dtype=dtype, requires_grad=True).clone()
    target = torch.randint(0, d["V"], (d["N"],))
    return (logits, target), lambda: cross_entropy(logits, target, **options).backward()


def _lce(d, dtype, **options):
    from fastft.ops import linear_cross_entropy
    x = torch.randn(d["N"], d["H"], dtype=dtype, requires_grad=True)
    w = (torch.randn(d["V"], d["H"], dtype=dtype) * 0.02).requires_grad_()
    target = torch.randint(0, d["V"], (d["N"],))
    return (x, w, target), lambda: linear_cross_entropy(x, w, target, **options).backward()


def _lsl(d, dtype, **options):
    from fastft.ops import linear_selective_log_softmax
    x = torch.randn(d["N"], d["H"], dtype=dtype, requires_grad=True)
    w = (torch.randn(d["V"], d["H"], dtype=dtype) * 0.02).requires_grad_()
    target = torch.randint(0, d["V"], (d["N"],))
    a = torch.randn(d["N"])

    def step():  # a policy term and an entropy bonus: both outputs' gradients
        logp, entropy = linear_selective_log_softmax(x, w, target, return_entropy=True)
        ((logp * a).sum() + 0.01 * entropy.sum()).backward()
    return (x, w, target, a), step


def _kl(d, dtype, **options):
    from fastft.ops import full_kl
    p = torch.randn(d["N"], d["V"], dtype=dtype, requires_grad=True)
    r = torch.randn(d["N"], d["V"], dtype=dtype)
    return (p, r), lambda: full_kl(p, r).backward()


def _sel(d, dtype, **options):
    from fastft.ops import selective_log_softmax
    logits = torch.randn(d["N"], d["V"], dtype=dtype, requires_grad=True)
    index = torch.randint(0, d["V"], (d["N"],))
    return (logits, index), lambda: selective_log_softmax(logits, index).sum().backward()


def _lkl(d, dtype, **options):
    from fastft.ops import linear_full_kl
    xp = torch.randn(d["N"], d["H"], dtype=dtype, requires_grad=True)
    wp = (torch.randn(d["V"], d["H"], dtype=dtype) * 0.02).requires_grad_()
    xr = torch.randn(d["N"], d["H"], dtype=dtype)
    wr = torch.randn(d["V"], d["H"], dtype=dtype) * 0.02
    return (xp, wp, xr, wr), lambda: linear_full_kl(xp, wp, xr, wr).backward()


def _lora(d, dtype, **options):
    from fastft.ops import lora_linear
    x = torch.randn(d["N"], d["H"], dtype=dtype, requires_grad=True)
    w = torch.randn(d["H"], d["H"], dtype=dtype) * 0.02
    a = (torch.randn(16, d["H"], dtype=dtype) * 0.02).requires_grad_()
    b = (torch.randn(d["H"], 16, dtype=dtype) * 0.02).requires_grad_()
    grad = torch.randn(d["N"], d["H"], dtype=dtype)
    return (x, w, a, b, grad), lambda: lora_linear(x, w, None, a, b, 2.0).backward(grad)


def _adapter(d, dtype, **options):
    from fastft.ops import adapter
    x = torch.randn(d["N"], d["H"], dtype=dtype, requires_grad=True)
    wd = (torch.randn(64, d["H"], dtype=dtype) * 0.02).requires_grad_()
    bd = torch.zeros(64, dtype=dtype, requires_grad=True)
    wu = (torch.randn(d["H"], 64, dtype=dtype) * 0.02).requires_grad_()
    bu = torch.zeros(d["H"], dtype=dtype, requires_grad=True)
    grad = torch.randn(d["N"], d["H"], dtype=dtype)
    return (x, wd, bd, wu, bu, grad), lambda: adapter(x, wd, bd, wu, bu, dropout_p=0.1).backward(grad)


def _rms(d, dtype, **options):
    from fastft.ops import rms_norm
    x = torch.randn(d["N"], d["H"], dtype=dtype, requires_grad=True)
    w = torch.ones(d["H"], dtype=dtype, requires_grad=True)
    grad = torch.randn(d["N"], d["H"], dtype=dtype)
    return (x, w, grad), lambda: rms_norm(x, w).backward(grad)


def _swiglu(d, dtype, **options):
    from fastft.ops import swiglu
    gate = torch.randn(d["N"], d["I"], dtype=dtype, requires_grad=True)
    up = torch.randn(d["N"], d["I"], dtype=dtype, requires_grad=True)
    grad = torch.randn(d["N"], d["I"], dtype=dtype)
    return (gate, up, grad), lambda: swiglu(gate, up).backward(grad)


def _nv(d):
    return d["N"] * d["V"] * B2


PLANS: List[OpPlan] = [
    OpPlan("cross_entropy", {"N": 8192, "V": 128256}, {"N": 256, "V": 2004}, _ce,
           lambda d: (_nv(d), "grad [N, V] (0 when written over the logits)"),
           lambda d: (2 * _nv(d), "read logits + write grad")),
    OpPlan("linear_cross_entropy", {"N": 8192, "H": 4096, "V": 128256}, {"N": 256, "H": 128, "V": 2004}, _lce,
           lambda d: (d["V"] * d["H"] * B2 + d["N"] * d["H"] * B2, "grad_W + grad_x (+ one logits chunk, below)"),
           lambda d: (3 * (d["N"] * d["H"] + d["V"] * d["H"]) * B2 + 4 * d["N"] * d["V"] * B2,
                      "3 GEMMs' operands once + the logits chunk written, read, written, read"),
           chunked=True),
    OpPlan("linear_selective_log_softmax", {"N": 8192, "H": 4096, "V": 128256}, {"N": 256, "H": 128, "V": 2004}, _lsl,
           lambda d: (d["V"] * d["H"] * B2 + d["N"] * d["H"] * B2, "grad_W + grad_x (+ one logits chunk, below)"),
           lambda d: (4 * (d["N"] * d["H"] + d["V"] * d["H"]) * B2 + 7 * d["N"] * d["V"] * B2,
                      "4 GEMMs' operands once (fwd, recompute, grad_x, grad_W) + the logits chunk written, read (fwd), "
                      "written, read + written (bwd kernel), read twice (grad GEMMs)"),
           chunked=True),
    OpPlan("full_kl", {"N": 8192, "V": 128256}, {"N": 256, "V": 2004}, _kl,
           lambda d: (_nv(d), "grad_policy [N, V]"), lambda d: (3 * _nv(d), "read policy + ref, write grad")),
    OpPlan("selective_log_softmax", {"N": 8192, "V": 128256}, {"N": 256, "V": 2004}, _sel,
           lambda d: (_nv(d), "grad [N, V]"), lambda d: (3 * _nv(d), "read logits (fwd, bwd) + write grad")),
    OpPlan("linear_full_kl", {"N": 8192, "H": 4096, "V": 128256}, {"N": 256, "H": 128, "V": 2004}, _lkl,
           lambda d: (d["V"] * d["H"] * B2 + d["N"] * d["H"] * B2, "grad_W + grad_x (+ logits chunks)"),
           lambda d: ((4 * d["N"] * d["H"] + 2 * d["V"] * d["H"]) * B2 + 2 * d["V"] * d["H"] * B2
                      + 6 * d["N"] * d["V"] * B2, "4 GEMMs' operands once + the two logits chunks"),
           chunked=True),
    OpPlan("lora_linear", {"N": 8192, "H": 4096}, {"N": 256, "H": 128}, _lora,
           lambda d: (2 * d["N"] * d["H"] * B2, "y + grad_x [N, H] (u [N, r] and grad A, B are small)"),
           lambda d: (7 * d["N"] * d["H"] * B2 + 2 * d["H"] * d["H"] * B2,
                      "fwd read x, write y; bwd read dy, x, write dx; W twice"), fixed=(1, 16, 17)),
    OpPlan("adapter", {"N": 16384, "H": 4096}, {"N": 512, "H": 128}, _adapter,
           lambda d: (2 * d["N"] * d["H"] * B2, "y + grad_x [N, H]"),
           lambda d: (6 * d["N"] * d["H"] * B2, "fwd read x, write y; bwd read dy, x(+pre), write dx"),
           fixed=(1, 64, 65)),
    OpPlan("rms_norm", {"N": 16384, "H": 4096}, {"N": 512, "H": 128}, _rms,
           lambda d: (2 * d["N"] * d["H"] * B2, "y + grad_x [N, H]"),
           lambda d: (5 * d["N"] * d["H"] * B2, "fwd read x, write y; bwd read dy, x, write dx")),
    OpPlan("swiglu", {"N": 16384, "I": 14336}, {"N": 512, "I": 448}, _swiglu,
           lambda d: (3 * d["N"] * d["I"] * B2, "out + grad_gate + grad_up"),
           lambda d: (8 * d["N"] * d["I"] * B2, "fwd read 2, write 1; bwd read 3, write 2")),
]


def _factor_fn(plan: OpPlan) -> Callable[[Tuple[int, ...]], float]:
    by_size = {plan.scaled[k]: plan.gpu[k] / plan.scaled[k] for k in plan.gpu}
    token = plan.gpu["N"] / plan.scaled["N"]

    def factor(shape):
        f = 1.0
        for size in shape:
            if size in by_size:
                f *= by_size[size]
            elif plan.chunked and size not in plan.fixed:
                f *= token  # the token rows of a chunk
        return f
    return factor


@dataclass
class Measured:
    peak: float                 # bytes at the GPU shape (scaled), extra above the inputs
    traffic: float
    gemm_traffic: float
    at_peak: List[Tuple[float, str]]
    raw_peak: float             # bytes measured here, unscaled


def _cuda_chunk_bytes(plan: OpPlan, dtype) -> int:
    """The [rows, V] chunk buffer the CUDA path picks at the GPU shape, from the library's own planner (on CUDA
    the budget also depends on the weight gradient's size), so the scaled run takes the GPU's chunk count."""
    from fastft.ops._losses import chunk_rows  # the planner itself, not a copy of its rule

    if "V" not in plan.gpu or "H" not in plan.gpu:
        return CUDA_CHUNK_BYTES
    item = torch.empty((), dtype=dtype).element_size()
    rows = chunk_rows(plan.gpu["N"], plan.gpu["V"], dtype, "cuda", 1, 0, grad_w_bytes=plan.gpu["V"] * plan.gpu["H"] * item)
    return rows * plan.gpu["V"] * item


def measure(plan: OpPlan, backend: str, dtype=torch.bfloat16, **options) -> Measured:
    """Runs the op's forward + backward on ``backend`` at the scaled shape under LiveBytes."""
    saved = {k: os.environ.get(k) for k in ("FASTFT_BACKEND", "FASTFT_LCE_CHUNK_BYTES")}
    nv_factor = (plan.gpu["N"] * plan.gpu.get("V", 1)) / (plan.scaled["N"] * plan.scaled.get("V", 1))
    os.environ["FASTFT_BACKEND"] = backend
    os.environ["FASTFT_LCE_CHUNK_BYTES"] = str(max(1, int(_cuda_chunk_bytes(plan, dtype) / nv_factor)))
    try:
        torch.manual_seed(0)
        inputs, step = plan.run(plan.scaled, dtype, **options)
        tracker = LiveBytes(_factor_fn(plan))
        launches = tracker.counting_triton_launches() if backend == "triton" else contextlib.nullcontext()
        with launches, tracker:
            step()
        return Measured(tracker.peak_scaled, tracker.traffic_scaled, tracker.gemm_traffic_scaled,
                        tracker.at_peak, tracker.peak)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _inplace_option() -> Optional[str]:
    """The name of cross_entropy's opt-in in-place gradient option, when the tree has one."""
    from fastft.ops import cross_entropy
    params = inspect.signature(cross_entropy).parameters
    return next((p for p in params if "inplace" in p or "in_place" in p), None)


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def render(results) -> str:
    lines = [
        "## Memory and traffic plan per op (bf16, forward + backward, at the GPU benchmark shapes)",
        "",
        "Computed by `python -m benchmarks.gpu_static.memory_plan` (run by `make gpu-static`): each op's forward "
        "and backward run here on CPU tensors at a scaled-down shape under a live-bytes tracker (a "
        "TorchDispatchMode over every op the Python glue issues), then every tensor is scaled to the GPU shape by "
        "its dimensions (terms in N x V, N x H, V x H scale as such; the chunk budget scales with N x V so the "
        "chunk count is the GPU's). `cuda-ext` is the glue of the CUDA-extension path (run with "
        "FASTFT_BACKEND=cpp: the same torch.ops.fastft kernel calls), `triton` the Triton path (interpreter). "
        "Peak = extra bytes above the inputs (outputs and gradients included); the minimum is what the math must "
        "hold. Traffic = bytes read + written by the ops the glue issues (a kernel sweeping a row twice counts "
        "once: a lower bound). GB = 1e9 bytes. A plan, not a GPU measurement.",
        "",
        "| op | path | GPU shape | peak extra GB | minimum GB | peak / min | traffic GB | minimum GB | traffic / min "
        "| GEMM traffic GB | minimum (memory; traffic) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    details = []
    for plan, path, m in results:
        if isinstance(m, str):
            lines.append(f"| {plan.op} | {path} | - | failed: {m} | | | | | | | |")
            continue
        mem, mem_what = plan.minimum_memory(plan.gpu)
        traffic, traffic_what = plan.minimum_traffic(plan.gpu)
        shape = "x".join(str(v) for v in plan.gpu.values())
        lines.append(f"| {plan.op} | {path} | {shape} | {_gb(m.peak)} | {_gb(mem)} | {m.peak / mem:.2f} "
                     f"| {_gb(m.traffic)} | {_gb(traffic)} | {m.traffic / traffic:.2f} | {_gb(m.gemm_traffic)} "
                     f"| {mem_what}; {traffic_what} |")
        if plan.chunked or plan.op == "cross_entropy":
            top = ", ".join(f"{what} {_gb(size)}" for size, what in m.at_peak[:6])
            here = "x".join(str(v) for v in plan.scaled.values())
            details.append(f"- {plan.op} / {path}: alive at the peak (GB at the GPU shape, shapes as run here): {top}. "
                           f"Measured here at {here}: {m.raw_peak / 1e6:.2f} MB peak extra.")
    lines += ["", "What is alive at the peak (largest first):", ""] + details
    lce = [(path, m) for plan, path, m in results if plan.op == "linear_cross_entropy" and not isinstance(m, str)]
    if lce:
        lines += ["", "Target (issue 20): fused linear CE at 8192x4096x128256 bf16, trainable head, peak extra "
                  "<= 1.3 GB: " + "; ".join(f"{path} {_gb(m.peak)} GB ({'meets' if m.peak <= 1.3 * GB else 'misses'})"
                                            for path, m in lce) + "; extra traffic over the GEMMs' own: "
                  + "; ".join(f"{path} {100 * (m.traffic / m.gemm_traffic - 1):.0f}%" for path, m in lce)
                  + " (target <= 10%)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    import fastft  # noqa: F401  (registers the ops)

    results = []
    inplace = _inplace_option()
    for plan in PLANS:
        variants = [({}, "")]
        if plan.op == "cross_entropy" and inplace:
            variants.append(({inplace: True}, f" {inplace}=True"))
        for options, suffix in variants:
            for backend, path in (("cpp", "cuda-ext"), ("triton", "triton")):
                try:
                    results.append((plan, path + suffix, measure(plan, backend, **options)))
                except Exception as exc:  # shown in the table; the static tier does not fail on the plan
                    results.append((plan, path + suffix, f"{type(exc).__name__}: {str(exc)[:120]}"))
                print(f"[memory-plan] {plan.op} {path}{suffix} done", file=sys.stderr, flush=True)
    sys.stdout.write(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
