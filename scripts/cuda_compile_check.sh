#!/usr/bin/env bash
# Build the whole extension fastft._C WITH its CUDA sources against a CUDA build of torch, then load
# it, so that CUDA code that does not compile, or does not register, cannot land. No GPU is needed: a
# CUDA build of torch imports without one, and loading fastft._C runs every TORCH_LIBRARY /
# TORCH_LIBRARY_IMPL registration and resolves every symbol (Python dlopens with RTLD_NOW). The load
# fails on a schema error, a CPU/CUDA kernel pair whose C++ signatures differ (issue 10: it aborted
# `import fastft` on every GPU machine), or an undefined symbol. It then checks that every kernel a
# csrc/cuda/*.cu file registers is there for CUDA and has a CPU twin.
#
# The CPU torch of .venv has no CUDA headers, so this keeps its own venv OUTSIDE the repo (reused
# across clones and runs) holding the cu130 torch wheel, and its own build folder (ninja reuses the
# object files of unchanged sources between runs):
#     FASTFT_CUDA_VENV    venv path            (default ~/.cache/fastft/cuda-venv)
#     FASTFT_CUDA_BUILD   build folder         (default ~/.cache/fastft/cuda-build)
#     FASTFT_CUDA_TORCH   pip requirement      (default torch==2.14.1, the pin this was checked with)
#     CUDA_HOME           toolkit holding nvcc (default: the toolkit of the nvcc on PATH, or /usr/local/cuda)
#     PYTHON_BOOT         python to create the venv with (default python3)
# Without a CUDA toolkit, nvcc itself comes from PyPI (nvidia-cuda-nvcc and friends, into that venv).
# One architecture (sm_90, TORCH_CUDA_ARCH_LIST=9.0) keeps it quick; nvcc warnings are errors here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTFT_CUDA_VENV:-$HOME/.cache/fastft/cuda-venv}"
BUILD="${FASTFT_CUDA_BUILD:-$HOME/.cache/fastft/cuda-build}"
TORCH_SPEC="${FASTFT_CUDA_TORCH:-torch==2.14.1}"
PYTHON_BOOT="${PYTHON_BOOT:-python3}"
PY="$VENV/bin/python"
START=$SECONDS

log() { printf '[cuda-check] %s\n' "$*"; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
export PYTHONWARNINGS=ignore TORCH_CPP_LOG_LEVEL=ERROR  # torch's "no numpy" / "no CUDA runtime" noise

shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
shopt -u nullglob
if [ ${#SOURCES[@]} -eq 0 ]; then
  log "no csrc/cuda/*.cu files; nothing to check"
  exit 0
fi

# ---- 1. The venv with a CUDA build of torch (created once, then reused) ---------------------------
venv_ok() {
  [ -x "$PY" ] && "$PY" - "$TORCH_SPEC" >/dev/null 2>&1 <<'EOF'
import sys, torch
want = sys.argv[1].partition("==")[2]
assert torch.version.cuda is not None, "not a CUDA build of torch"
assert not want or torch.__version__.split("+")[0] == want, torch.__version__
EOF
}

if venv_ok; then
  log "reusing $VENV"
else
  log "creating $VENV with $TORCH_SPEC (once; about 5.5 GB)"
  mkdir -p "$(dirname "$VENV")"
  [ -x "$PY" ] || "$PYTHON_BOOT" -m venv "$VENV"
  "$PY" -m pip install -q "$TORCH_SPEC"
  if ! venv_ok; then
    log "FAILED: $VENV does not hold a CUDA build of $TORCH_SPEC:"
    "$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' || true
    exit 1
  fi
fi

# ---- 2. nvcc and the toolkit holding it ----------------------------------------------------------
toolkit_of() {  # the toolkit root the given nvcc really uses (/usr/local/bin/nvcc may be a wrapper script)
  "$1" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1
}
pip_nvcc_dir() {  # site-packages/nvidia/cu<major>, where the nvidia-cuda-nvcc wheel puts bin/nvcc
  "$PY" -c 'import os, sys, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu" + sys.argv[1]))' "$1" 2>/dev/null || true
}
NVCC=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  NVCC=/usr/local/cuda/bin/nvcc
else
  # No toolkit installed (e.g. a bare CI runner): nvcc from PyPI, the CUDA release torch was built with
  # (nvcc and the cccl headers must agree; pip would otherwise pick the newest of each). A no-op when present.
  CU="$("$PY" -c 'import torch; print(torch.version.cuda)')"
  log "no CUDA toolkit found; nvcc $CU from PyPI into $VENV"
  "$PY" -m pip install -q "nvidia-cuda-nvcc==$CU.*" "nvidia-cuda-crt==$CU.*" "nvidia-nvvm==$CU.*" \
    "nvidia-cuda-cccl==$CU.*" "nvidia-cuda-runtime==$CU.*"
  dir="$(pip_nvcc_dir "${CU%%.*}")"
  NVCC="$dir/bin/nvcc"
fi
TOP="$(toolkit_of "$NVCC" || true)"
if [ -z "$TOP" ]; then
  log "FAILED: $NVCC does not run:"
  "$NVCC" --version || true
  exit 1
fi
CUDA_HOME="$(cd "$TOP" && pwd -P)"
export CUDA_HOME  # torch guesses wrong here (/usr/local); everything below sees the toolkit nvcc uses
NVCC="$CUDA_HOME/bin/nvcc"
log "nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $NVCC"

# ---- 3. Build fastft._C with CUDA into $BUILD (never in place: .venv's CPU build has the same file name)
"$PY" -c 'import ninja, setuptools' 2>/dev/null || "$PY" -m pip install -q ninja setuptools wheel
mkdir -p "$BUILD"
rm -rf "$BUILD/lib"  # only the freshly linked library may be loaded below
log "building fastft._C with CUDA (object files cached in $BUILD/temp)"
t0=$SECONDS
if ! (cd "$ROOT" && PATH="$VENV/bin:$PATH" FASTFT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
      FASTFT_NVCC_FLAGS="-Werror all-warnings" MAX_JOBS="$(nproc 2>/dev/null || echo 2)" \
      "$PY" setup.py -q build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib") >"$TMP/build.log" 2>&1; then
  log "FAILED: the CUDA build of fastft._C did not compile or link:"
  grep -E '(error|FAILED)' -A4 "$TMP/build.log" | head -n 150 || tail -n 150 "$TMP/build.log"
  exit 1
fi
LIB="$(find "$BUILD/lib" -name '_C*.so' | head -n 1)"
log "built $(basename "$LIB") in $((SECONDS - t0))s"

# ---- 4. Load it: registrations run, symbols resolve; then check the kernel table ----------------
# A signature mismatch is a c10::Error thrown from a static initializer: it terminates the process,
# so the load runs in its own interpreter and any non-zero exit (abort included) is a failure.
if ! "$PY" - "$LIB" "$ROOT/csrc/cuda" >"$TMP/load.log" 2>&1 <<'EOF'
import glob, importlib.util, os, re, sys
import torch

lib, cuda_dir = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("fastft._C", lib)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # runs every TORCH_LIBRARY(_FRAGMENT/_IMPL) of the .so
assert module.with_cuda, "fastft._C was built without its CUDA sources"

has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
problems = []
for path in sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))):
    file = os.path.basename(path)
    names = re.findall(r'm\.impl\(\s*"([A-Za-z0-9_]+)"', open(path).read())
    if not names:
        problems.append(f"{file} registers no CUDA kernel")
    for name in names:
        if not has_kernel(f"fastft::{name}", "CUDA"):
            problems.append(f"fastft::{name}: no CUDA kernel after the load ({file})")
        if not has_kernel(f"fastft::{name}", "CPU"):
            problems.append(f"fastft::{name}: a CUDA kernel without a CPU twin ({file})")
    print(f"  {file}: {len(names)} CUDA kernel(s): {', '.join(names)}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
EOF
then
  log "FAILED: loading the CUDA build of fastft._C:"
  sed 's/^/    /' "$TMP/load.log"
  exit 1
fi
cat "$TMP/load.log"
log "loaded: every registration and symbol resolved ($((SECONDS - START))s)"
