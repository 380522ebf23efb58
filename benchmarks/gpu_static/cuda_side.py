"""The CUDA-extension kernels (csrc/cuda/*.cu) compiled for sm_90 and sm_80 with nvcc, device code only
(``-cubin``: no host compile, so a file takes seconds, not minutes), with the flags setup.py gives them.
Registers, shared and local memory come from ``cuobjdump -res-usage``, loads from ``cuobjdump -sass``.

Threads per CTA are read from each kernel's launch site (``kernel<T><<<grid, THREADS, ...>>>``): a number, a
``constexpr int`` of the file or of an included header, or ``threads_for_row(V, sizeof(T))``, evaluated here at
the GPU benchmark row lengths with the constants of csrc/cuda/_block_reduce.cuh. Cubins are cached under
~/.cache/fastft/gpu-static (FASTFT_GPU_STATIC_CACHE), keyed by the hash of csrc/, the flags and nvcc's version,
so a rerun with unchanged sources compiles nothing.

The torch headers come from the CUDA build of torch that scripts/cuda_compile_check.sh keeps in its venv
(FASTFT_CUDA_VENV, default ~/.cache/fastft/cuda-venv); nvcc from CUDA_HOME, PATH or /usr/local/cuda, as there.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .triton_side import cuobjdump_path, read_resources, read_sass

__all__ = ["CudaKernel", "ROW_LENGTHS", "build_cuda_kernels", "find_nvcc", "launch_threads", "threads_for_row"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")

# Row lengths at the GPU benchmark shapes (benchmarks/bench_*.py) for kernels whose threads depend on them:
# vocabularies (Llama-2, an odd one, Llama-3) for the per-row softmax kernels, the hidden size for RMSNorm.
ROW_LENGTHS = {"cross_entropy": (32000, 32001, 128256), "kl": (32001, 128256), "rms_norm": (4096,)}
_ELEMENT_SIZE = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8}


@dataclass
class CudaKernel:
    file: str            # e.g. "kl.cu"
    name: str            # demangled, without its parameters, e.g. "fastft::full_kl_fwd_kernel<c10::BFloat16>"
    arch: str
    threads: int
    config: str          # e.g. "V=128256 threads=1024"
    regs: int = 0
    smem: int = 0
    local: int = 0
    sass: str = ""
    error: Optional[str] = None

    @property
    def short_name(self) -> str:
        """e.g. "full_kl_fwd_kernel<BFloat16>"."""
        base, _, template = self.name.partition("<")
        return re.sub(r"^.*::", "", base) + ("<" + template.replace("c10::", "") if template else "")


def _cuda_venv() -> str:
    return os.environ.get("FASTFT_CUDA_VENV", os.path.expanduser("~/.cache/fastft/cuda-venv"))


def find_nvcc() -> Optional[str]:
    """As scripts/cuda_compile_check.sh looks for it: CUDA_HOME, PATH, /usr/local/cuda, else the nvcc it
    installed from PyPI into its venv on a machine without a toolkit."""
    home = os.environ.get("CUDA_HOME")
    pip_nvcc = sorted(glob.glob(os.path.join(_cuda_venv(), "lib", "python3*", "site-packages", "nvidia", "cu*",
                                             "bin", "nvcc")))
    for candidate in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "",
                                                                             "/usr/local/cuda/bin/nvcc"] + pip_nvcc:
        if candidate and os.access(candidate, os.X_OK):
            return _real_nvcc(candidate)
    return None


def _real_nvcc(nvcc: str) -> str:
    """The toolkit's own nvcc (one on PATH may be a wrapper script): nvcc --dryrun names its TOP folder."""
    run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    top = next((line.split("=", 1)[1].strip() for line in (run.stdout + run.stderr).splitlines()
                if line.startswith("#$ TOP=")), "")
    real = os.path.join(os.path.realpath(top), "bin", "nvcc") if top else ""
    return real if real and os.access(real, os.X_OK) else nvcc


def _torch_includes() -> Optional[List[str]]:
    venv = _cuda_venv()
    hits = sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "torch", "include")))
    if not hits or not os.path.isdir(os.path.join(hits[-1], "c10", "cuda")):
        return None
    return [hits[-1], os.path.join(hits[-1], "torch", "csrc", "api", "include")]


def _flags(nvcc: str, torch_includes: List[str]) -> List[str]:
    # What setup.py's CUDAExtension passes (see the build.ninja of `make cuda-check`), minus host-only flags.
    toolkit_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    return (["-I" + CSRC] + ["-I" + p for p in torch_includes]
            + ["-I" + toolkit_include, "-I" + sysconfig.get_paths()["include"],
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", "-DFASTFT_WITH_CUDA",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20"])


def _cache_key(source: str, flags: List[str], nvcc_version: str, arch: str) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)):
        if path.endswith((".cu", ".cuh", ".h")):  # the file and every header it may include
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(" ".join(flags + [nvcc_version, arch, source]).encode())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------------
# Launch configuration from the source
# ------------------------------------------------------------------------------------------------

def _constants(text: str) -> Dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr\s+(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*(\d+)\s*;", text)}


def _header_text() -> str:
    return "".join(open(p).read() for p in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))))


def threads_for_row(row_length: int, element_size: int, constants: Dict[str, int]) -> int:
    """csrc/cuda/_block_reduce.cuh's threads_for_row: one warp per 32 16-byte packs of the row, capped."""
    warp, max_threads = constants["kWarp"], constants["kMaxThreads"]
    packs = (row_length * element_size + 15) // 16
    warps = min(max(1, -(-packs // warp)), max_threads // warp)
    return warps * warp


_LAUNCH = re.compile(r"\b(\w+)(?:<[^<>;]*>)?\s*<<<\s*([^;]*?)>>>", re.S)
_KERNEL_ALIAS = re.compile(r"\bauto\s+(\w+)\s*=\s*([^;]*?);")


def launch_threads(text: str) -> Dict[str, str]:
    """{kernel base name: its launch site's threads-per-CTA expression} for one .cu file. A launch through a
    variable that picks one of a kernel's instantiations at run time (``auto kernel = mixed ? k<T, true> :
    k<T, false>; kernel<<<...>>>``) is the site of every kernel named in that choice."""
    sites, launches = {}, []
    for m in _LAUNCH.finditer(text):
        args, depth, current = [], 0, ""
        for ch in m.group(2):
            depth += ch in "(<" and 1 or 0
            depth -= ch in ")>" and 1 or 0
            if ch == "," and depth == 0:
                args.append(current.strip())
                current = ""
            else:
                current += ch
        args.append(current.strip())
        if len(args) >= 2:
            sites[m.group(1)] = args[1]
            launches.append((m.start(), m.group(1), args[1]))
    for alias in _KERNEL_ALIAS.finditer(text):
        threads = next((t for start, name, t in launches if start > alias.end() and name == alias.group(1)), None)
        if threads is not None:
            for name in re.findall(r"\b(\w+)\s*<", alias.group(2)):
                sites.setdefault(name, threads)
    return sites


def _configs(file: str, base: str, expression: str, element_size: int, constants: Dict[str, int]):
    """[(threads, config text)] for one kernel; raises ValueError when the expression is not understood."""
    expression = re.sub(r"^static_cast<\w+>\((.*)\)$", r"\1", expression.strip())
    if expression.isdigit():
        return [(int(expression), f"threads={expression}")]
    name = expression.split("::")[-1]
    if name in constants:
        return [(constants[name], f"threads={constants[name]} ({name})")]
    if expression.startswith("threads_for_row("):
        stem = file[:-3]
        label = "H" if stem == "rms_norm" else "V"
        return [(threads_for_row(n, element_size, constants), f"{label}={n} threads={threads_for_row(n, element_size, constants)}")
                for n in ROW_LENGTHS.get(stem, ())]
    raise ValueError(f"{file}: launch of {base} with threads '{expression}' is not understood")


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------

def _demangle(names: List[str], nvcc: str) -> Dict[str, str]:
    filt = os.path.join(os.path.dirname(nvcc), "cu++filt")
    tool = filt if os.access(filt, os.X_OK) else shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def build_cuda_kernels(archs, workers: int = 2, log=print) -> Tuple[List[CudaKernel], Optional[str]]:
    """(kernels, None) or ([], why the CUDA side was skipped)."""
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    if not sources:
        return [], "no csrc/cuda/*.cu"
    nvcc = find_nvcc()
    if nvcc is None:
        return [], "no nvcc (CUDA_HOME, PATH, /usr/local/cuda)"
    includes = _torch_includes()
    if includes is None:
        return [], "no CUDA build of torch for its headers (run `make cuda-check` once to create its venv)"
    if cuobjdump_path() is None:
        return [], "no cuobjdump"
    flags = _flags(nvcc, includes)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cache = os.environ.get("FASTFT_GPU_STATIC_CACHE", os.path.expanduser("~/.cache/fastft/gpu-static"))
    os.makedirs(cache, exist_ok=True)

    jobs = []
    for source in sources:
        for arch in archs:
            cubin = os.path.join(cache, f"{os.path.basename(source)[:-3]}-{arch}-{_cache_key(source, flags, version, arch)}.cubin")
            jobs.append((source, arch, cubin))

    def compile_job(job):
        source, arch, cubin = job
        if os.path.exists(cubin):
            return None
        cap = arch.split("_")[1]
        cmd = [nvcc, "-cubin", f"-gencode=arch=compute_{cap},code=sm_{cap}", *flags, source, "-o", cubin + ".tmp"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return (run.stderr or run.stdout).strip()[-800:]
        os.replace(cubin + ".tmp", cubin)
        return None

    todo = [j for j in jobs if not os.path.exists(j[2])]
    if todo:
        log(f"[gpu-static] nvcc: {len(todo)} cubin(s) to build ({len(jobs) - len(todo)} cached in {cache})")
    with ThreadPoolExecutor(workers) as pool:
        errors = dict(zip([j[:2] for j in jobs], pool.map(compile_job, jobs)))

    headers = _header_text()
    kernels: List[CudaKernel] = []
    for source, arch, cubin in jobs:
        file = os.path.basename(source)
        error = errors[(source, arch)]
        if error:
            kernels.append(CudaKernel(file, file, arch, 0, "", error=f"nvcc failed: {error}"))
            continue
        text = open(source).read()
        constants = {**_constants(headers), **_constants(text)}
        sites = launch_threads(text)
        resources, sass = read_resources(cubin), read_sass(cubin)
        names = _demangle(sorted(resources), nvcc)
        for mangled, (regs, stack, shared, local) in sorted(resources.items(), key=lambda kv: names[kv[0]]):
            # "fastft::(anonymous namespace)::kl_kernel<c10::BFloat16>(args...)" -> "fastft::kl_kernel<c10::BFloat16>"
            name = names[mangled].replace("(anonymous namespace)::", "").split("(")[0]
            base = re.sub(r"^.*::", "", name.split("<")[0])
            types = re.search(r"<([^<>]*)>", name)
            element_size = _ELEMENT_SIZE.get(types.group(1).split(",")[0].strip(), 2) if types else 2
            try:
                if base not in sites:
                    raise ValueError(f"{file}: no launch site found for {base}")
                configs = _configs(file, base, sites[base], element_size, constants)
            except ValueError as exc:
                kernels.append(CudaKernel(file, name, arch, 0, "", error=str(exc)))
                continue
            for threads, config in configs:
                # Spills go to the stack frame (STACK) or local memory (LOCAL): both are per-thread DRAM traffic.
                kernels.append(CudaKernel(file, name, arch, threads, config, regs, shared, local + stack,
                                          sass.get(mangled, "")))
    return kernels, None
