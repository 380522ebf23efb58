"""python -m benchmarks.gpu_static [--no-fail] [--skip-cuda] [--skip-plan] [--out PATH]

Writes benchmarks/results/gpu_static.md and exits 1 when a kernel spills, cannot launch or is below its floor
(--no-fail: report only)."""
import os

# Triton decides at @triton.jit time whether a kernel is compiled or interpreted: compiling for a GPUTarget
# needs the compiler, so the interpreter is switched off for this process before anything imports triton.
# (The memory plan runs ops under the interpreter: it has its own process.)
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import List, Optional  # noqa: E402

from .floors import FLOORS, KNOWN_GAPS, check, floor_for, known_gap  # noqa: E402
from .loads import count_global_loads  # noqa: E402
from .occupancy import ARCHS, occupancy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "gpu_static.md")


@dataclass
class Row:
    side: str        # "triton" or "cuda"
    op: str          # module / .cu file
    kernel: str
    call: str        # the production call or launch configuration
    arch: str
    regs: int
    local: int
    smem: int
    threads: int
    ctas: int
    warps: int
    limiter: str
    vector16: int
    loads: int
    floor: str
    failures: List[str]
    gaps: List[str]  # failures excused by floors.KNOWN_GAPS (listed, not failing)

    @property
    def passed(self) -> bool:
        return not self.failures


def _row(side, op, kernel, call, arch, regs, local, smem, threads, sass, error: Optional[str]) -> Row:
    floor = floor_for(kernel)
    if error or not threads:
        occ_ctas, occ_warps, limiter = 0, 0, "-"
    else:
        occ = occupancy(ARCHS[arch], regs, threads, smem)
        occ_ctas, occ_warps, limiter = occ.ctas_per_sm, occ.warps_per_sm, occ.limiter
    loads = count_global_loads(sass)
    found = check(floor, occ_ctas, occ_warps, local, loads.vector16, error)
    gaps = [w for w in found if known_gap(side, kernel, w)]
    failures = [w for w in found if w not in gaps]
    return Row(side, op, kernel, call, arch, regs, local, smem, threads, occ_ctas, occ_warps, limiter,
               loads.vector16, loads.total, floor.describe(), failures, gaps)


def triton_rows(archs, workers, only=None) -> List[Row]:
    from . import triton_side

    scenarios = [s for s in triton_side.SCENARIOS if not only or s.op in only]
    launches, failures = triton_side.capture_launches(scenarios)
    builds = triton_side.compile_launches(launches, archs, workers=workers)
    rows = []
    for b in builds:
        l = b.launch
        rows.append(_row("triton", l.module.rsplit(".", 1)[-1], l.kernel, f"{'; '.join(dict.fromkeys(l.calls))}: {l.config}", b.arch,
                         b.regs, b.local, b.smem, l.threads, b.sass, b.error))
    for scenario, error in failures:
        for arch in archs:
            rows.append(_row("triton", scenario.op, "(launcher)", scenario.label, arch, 0, 0, 0, 0, "",
                             f"production call failed: {error}"))
    launched = {l.kernel for l in launches}
    for name, module in sorted(triton_side.all_kernel_names().items() if not only else ()):
        if name not in launched:
            for arch in archs:
                rows.append(_row("triton", module.rsplit(".", 1)[-1], name, "-", arch, 0, 0, 0, 0, "",
                                 "no production call in triton_side.SCENARIOS launches it"))
    return rows


def cuda_rows(archs, workers, log) -> (List[Row], Optional[str]):
    from . import cuda_side

    kernels, skipped = cuda_side.build_cuda_kernels(archs, workers=workers, log=log)
    rows = [_row("cuda", k.file, k.short_name, k.config, k.arch, k.regs, k.local, k.smem, k.threads, k.sass, k.error)
            for k in kernels]
    return rows, skipped


def _table(rows: List[Row]) -> List[str]:
    out = ["| kernel | call : config | arch | regs | stack+local B | smem B | threads | CTA/SM | warps/SM | limiter "
           "| 16B loads / all | floor | result |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        result = ("FAIL: " + "; ".join(r.failures) if r.failures
                  else "KNOWN GAP: " + "; ".join(r.gaps) if r.gaps else "PASS")
        out.append(f"| {r.kernel} | {r.call} | {r.arch} | {r.regs} | {r.local} | {r.smem} | {r.threads} | {r.ctas} "
                   f"| {r.warps} | {r.limiter} | {r.vector16} / {r.loads} | {r.floor} | {result.replace('|', '/')} |")
    return out


def render(rows: List[Row], cuda_skipped: Optional[str], plan_md: Optional[str], seconds: float) -> str:
    base = lambda r: (r.side, r.op, r.kernel.split("<")[0])  # noqa: E731  (a CUDA kernel's instantiations as one)
    failing = sorted({base(r) for r in rows if not r.passed})
    lines = [
        "# Static GPU tier: kernels compiled for sm_90 and sm_80 without a GPU",
        "",
        "Generated by `make gpu-static` (`python -m benchmarks.gpu_static`); do not edit by hand. Every Triton "
        "kernel of kernels/ is compiled with Triton's own compiler for a `GPUTarget` at the launch configurations "
        "its launcher picks for CUDA tensors at the GPU benchmark shapes (the launchers run on fake CUDA tensors); "
        "every CUDA-extension kernel of csrc/cuda/ with nvcc, its threads per CTA read from its launch site. "
        "Registers, shared memory (static + dynamic, bytes) and stack frame + local memory (register spills, "
        "local arrays or the frames of non-inlined calls: per-thread DRAM traffic either way) are read from the cubin "
        "(`cuobjdump -res-usage`), loads from its SASS (`LDG.E.128` = 16 bytes per thread; counts are static: "
        "instructions, not executions). CTA/SM and warps/SM follow the CUDA occupancy calculator "
        "(benchmarks/gpu_static/occupancy.py; sm_90: 132 SMs, 65,536 registers, 228 KB shared memory, 2,048 "
        "threads, 32 CTAs per SM; sm_80: 108 SMs, 164 KB). On sm_90 the cubin's static shared memory already holds "
        "1 KB that ptxas sets aside, and the driver's 1 KB reserve per CTA is added on top: the count errs towards "
        "fewer CTAs. These are predictions from the compiler's output, not GPU measurements.",
        "",
        f"Run time: {seconds:.0f} s. Kernel builds: {len(rows)}, failing their floor: "
        f"{sum(not r.passed for r in rows)}.",
        "",
        "## Floors (benchmarks/gpu_static/floors.py)",
        "",
        "| kernels (pattern) | floor | why |",
        "|---|---|---|",
    ]
    lines += [f"| `{f.pattern}` | {f.describe()}, 0 B stack/local | {f.why} |" for f in FLOORS]
    lines += ["", "## Below their floor today", ""]
    if failing:
        for key in failing:
            bad = [r for r in rows if base(r) == key and not r.passed]
            reasons = sorted({w for r in bad for w in r.failures})
            archs = sorted({r.arch for r in bad})
            variants = sorted({r.kernel.partition("<")[2].rstrip(">") for r in bad} - {""})
            which = f" <{' / '.join(variants)}>" if variants else ""
            calls = len({r.call for r in bad})
            lines.append(f"- {key[0]} `{key[2]}`{which} ({key[1]}; {', '.join(archs)}; {calls} configuration(s)): "
                         f"{'; '.join(reasons)}")
    else:
        lines.append("None.")
    lines += ["", "## Known gaps (benchmarks/gpu_static/floors.py KNOWN_GAPS: listed, not failing)", ""]
    for g in KNOWN_GAPS:
        hits = sorted({f"{r.kernel.split('<')[0]} {r.arch}" for r in rows if r.side == g.side and any(
            known_gap(r.side, r.kernel, w) is g for w in r.gaps)})
        lines.append(f"- {g.side} `{g.pattern}` — {g.failure}: {g.why} "
                     f"({len(hits)} kernel/arch build(s){'' if hits else ': STALE, excuses nothing'})")
    if not KNOWN_GAPS:
        lines.append("None.")
    for side, title in (("triton", "Triton kernels (kernels/)"), ("cuda", "CUDA-extension kernels (csrc/cuda/)")):
        lines += ["", f"## {title}", ""]
        if side == "cuda" and cuda_skipped:
            lines.append(f"Skipped: {cuda_skipped}.")
            continue
        side_rows = sorted((r for r in rows if r.side == side), key=lambda r: (r.op, r.kernel, r.call, r.arch))
        lines += _table(side_rows)
    if plan_md:
        lines += ["", plan_md.strip()]
    return "\n".join(lines) + "\n"


def run_plan(log) -> Optional[str]:
    """The memory plan in its own process: it runs the ops, Triton ones under the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_static.memory_plan"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        log(run.stderr[-3000:])
        raise SystemExit("[gpu-static] the memory plan failed")
    return run.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_static", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--no-fail", action="store_true", help="report only: exit 0 whatever the table says")
    parser.add_argument("--skip-cuda", action="store_true", help="Triton kernels only")
    parser.add_argument("--skip-plan", action="store_true", help="no memory/traffic plan section")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: sm_90 and sm_80")
    parser.add_argument("--only", action="append", metavar="OP",
                        help="Triton scenarios of this op only (e.g. swiglu); skips the CUDA side and the plan")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    archs = args.arch or ["sm_90", "sm_80"]
    start = time.time()
    log("[gpu-static] Triton: capturing the production launches and compiling them")
    rows = triton_rows(archs, args.workers, args.only)
    cuda_skipped = "--skip-cuda" if args.skip_cuda else "--only" if args.only else None
    if not cuda_skipped:
        log("[gpu-static] CUDA extension: nvcc cubins")
        cuda, cuda_skipped = cuda_rows(archs, args.workers, log)
        rows += cuda
    plan_md = None
    if not (args.skip_plan or args.only):
        log("[gpu-static] memory and traffic plan")
        plan_md = run_plan(log)
    text = render(rows, cuda_skipped, plan_md, time.time() - start)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    failing = [r for r in rows if not r.passed]
    log(f"[gpu-static] wrote {args.out}: {len(rows)} kernel builds, {len(failing)} below their floor "
        f"({time.time() - start:.0f} s)")
    for r in failing:
        log(f"  FAIL {r.side} {r.kernel} [{r.call}] {r.arch}: {'; '.join(r.failures)}")
    if cuda_skipped and not (args.skip_cuda or args.only):
        log(f"[gpu-static] CUDA side skipped: {cuda_skipped}")
    return 0 if args.no_fail or not failing else 1


if __name__ == "__main__":
    sys.exit(main())
