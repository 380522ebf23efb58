"""Build script: the Python package, Triton kernels shipped as ``fastft.kernels``, and the C++ extension.

The extension ``fastft._C`` holds every C++ CPU kernel (csrc/cpu) and, when built with CUDA
(``FASTFT_BUILD_CUDA=1``, or auto when torch sees a GPU and nvcc), the CUDA kernels (csrc/cuda).
csrc/schemas.cpp declares every kernel schema once (TORCH_LIBRARY); each kernel file registers its implementation
(TORCH_LIBRARY_IMPL) in the ``fastft`` namespace, so the Python
side finds them as ``torch.ops.fastft.*`` after ``import fastft._C``.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("FASTFT_BUILD_CUDA", "auto").lower()
    if flag in ("0", "no", "false"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    if flag in ("1", "yes", "true"):
        return True
    import torch

    return torch.cuda.is_available() and CUDA_HOME is not None


def _gcc_major() -> int:
    """Major version of the C++ compiler torch will call when it is GCC, else 0 (clang, or unknown)."""
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    try:
        banner = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    if "clang" in banner.lower() or not version.strip().split(".")[0].isdigit():
        return 0
    return int(version.strip().split(".")[0])


def _extensions():
    if os.environ.get("FASTFT_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -Wno-maybe-uninitialized: GCC false positives inside ATen's AVX-512 half/bf16 helpers bury real warnings.
    cxx = ["-O3", "-fopenmp", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas"]
    if os.environ.get("FASTFT_NATIVE", "1") == "1":
        # The wheel built on a user's machine is for that machine; -march=native lets at::vec use AVX-512/AVX2.
        cxx.append("-march=native")
        if 0 < _gcc_major() <= 12:
            # GCC <= 12 flags the deliberately undefined operand (_mm512_undefined_ps()) of AVX-512 intrinsics
            # that ATen's Vectorized<float> inlines into our kernels: "'__Y' is used uninitialized" (GCC bug
            # 105593, fixed in GCC 13). Only there, so newer compilers still report our own uninitialized reads.
            cxx.append("-Wno-uninitialized")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        # FASTFT_NVCC_FLAGS: extra nvcc flags, e.g. the CI check's "-Werror all-warnings".
        nvcc = ["-O3", "-DFASTFT_WITH_CUDA"] + os.environ.get("FASTFT_NVCC_FLAGS", "").split()
        ext = CUDAExtension(
            "fastft._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DFASTFT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("fastft._C", sources, include_dirs=include_dirs, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastft", "fastft.*"]) + ["fastft.kernels"],
    package_dir={"fastft.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
