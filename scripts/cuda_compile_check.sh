#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc against a CUDA build of torch, so CUDA code that does
# not compile cannot land. Nothing is linked or run: development machines and CI have no GPU.
#
# The CPU torch of .venv has no CUDA headers, so this keeps its own venv OUTSIDE the repo (reused
# across clones and runs) holding the cu130 torch wheel:
#     FASTFT_CUDA_VENV    venv path            (default ~/.cache/fastft/cuda-venv)
#     FASTFT_CUDA_TORCH   pip requirement      (default torch==2.14.1, the pin this was checked with)
#     CUDA_HOME           toolkit holding nvcc (default: the toolkit of the nvcc on PATH, or /usr/local/cuda)
#     PYTHON_BOOT         python to create the venv with (default python3)
# Without a CUDA toolkit, nvcc itself comes from PyPI (nvidia-cuda-nvcc and friends, into that venv).
#
# Flags mirror torch.utils.cpp_extension's CUDA build (COMMON_NVCC_FLAGS, -fPIC, TORCH_EXTENSION_NAME,
# TORCH_API_INCLUDE_EXTENSION_H, the C++ ABI torch was built with, its -std) plus setup.py's nvcc flags, for one
# architecture (sm_90) to keep it quick. Prints one line per file; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTFT_CUDA_VENV:-$HOME/.cache/fastft/cuda-venv}"
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

# ---- 3. Flags, as torch's CUDAExtension build would pass them ------------------------------------
# C++ standard: setup.py leaves it to torch. torch >= 2.14's headers need c++20 (operator<=>), and its
# extension builds default to it; older torch (e.g. a GPU box's 2.11) gets c++17, the common floor.
if ! "$PY" - >"$TMP/flags" 2>"$TMP/flags.err" <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension as ce
try:
    paths = ce.include_paths(device_type="cuda")   # torch >= 2.6
except TypeError:
    paths = ce.include_paths(cuda=True)
for p in paths:
    print(f"-I{p}")
print(f"-I{sysconfig.get_paths()['include']}")
for f in ce.COMMON_NVCC_FLAGS:                     # -D__CUDA_NO_HALF_OPERATORS__ ..., --expt-relaxed-constexpr
    print(f)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
major, minor = (int(v) for v in torch.__version__.split(".")[:2])
print("-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17")
print(torch.__version__)
EOF
then
  log "FAILED: could not read the build flags from $PY:"
  cat "$TMP/flags.err"
  exit 1
fi
mapfile -t TORCH_FLAGS < <(sed '$d' "$TMP/flags")
FLAGS=(
  "${TORCH_FLAGS[@]}"
  -I"$ROOT/csrc"
  --compiler-options -fPIC
  -O3                                     # setup.py's nvcc flags
  -DFASTFT_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  -gencode arch=compute_90,code=sm_90
  -Werror all-warnings                    # a warning here is a failure: nothing else would ever read it
)
log "torch $(tail -n 1 "$TMP/flags"), $(grep -o 'c++[0-9]*' "$TMP/flags"), sm_90"

# ---- 4. Compile each file (one nvcc per core; each is single-threaded) ---------------------------
JOBS="$(nproc 2>/dev/null || echo 2)"
compile() {  # $1 = index into SOURCES; leaves $TMP/$1.{log,rc,secs}
  local t0=$SECONDS rc=0
  "$NVCC" -c "${SOURCES[$1]}" -o "$TMP/$1.o" "${FLAGS[@]}" >"$TMP/$1.log" 2>&1 || rc=$?
  echo "$rc" >"$TMP/$1.rc"
  echo $((SECONDS - t0)) >"$TMP/$1.secs"
}
for i in "${!SOURCES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  compile "$i" &
done
wait
FAILED=0
for i in "${!SOURCES[@]}"; do
  rel="${SOURCES[$i]#"$ROOT"/}"
  if [ "$(cat "$TMP/$i.rc")" = 0 ]; then
    printf 'ok      %s (%ss)\n' "$rel" "$(cat "$TMP/$i.secs")"
  else
    printf 'FAILED  %s (%ss)\n' "$rel" "$(cat "$TMP/$i.secs")"
    sed 's/^/    /' "$TMP/$i.log"
    FAILED=$((FAILED + 1))
  fi
done

log "${#SOURCES[@]} file(s), $FAILED failed, $((SECONDS - START))s"
[ "$FAILED" -eq 0 ]
