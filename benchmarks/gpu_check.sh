#!/usr/bin/env bash
# GPU check, for a CUDA machine with its own torch + triton, no network, no pip installs:
#   bash benchmarks/gpu_check.sh OUTDIR        (from anywhere; it cd's to the repo root)
# 1. builds fastft._C with the CUDA kernels in place (log: OUTDIR/build.log; on failure it goes on
#    with Triton only), 2. `python3 -m fastft info`, 3. `python3 -m pytest -m cuda` (OUTDIR/pytest.log),
# 4. the GPU benchmarks `python3 -m benchmarks.run_demo --device cuda` (OUTDIR/bench.log, result
#    files in OUTDIR/results/), 5. prints a summary (also OUTDIR/summary.txt).
# Whole run within GPU_CHECK_BUDGET_S (default 450 s, under 8 minutes); each step has a timeout.
#
# Imports come from the source tree, no pip install: PYTHONPATH=<repo root>. `fastft.kernels` is
# the top-level kernels/ folder only through setup.py's package_dir mapping (an install), so when
# fastft/kernels does not exist the script makes a temporary symlink fastft/kernels -> ../kernels
# and removes it on exit (trap), leaving the tree as it found it.
# Environment knobs: PYTHON (default python3), CUDA_HOME (else found from nvcc), TORCH_CUDA_ARCH_LIST
# (default 9.0), GPU_CHECK_BUDGET_S. An existing PYTHONPATH is kept after the repo root (e.g. a folder
# holding liger_kernel, to benchmark it where it is not installed).
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT/results" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
T0=$SECONDS
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
# Seconds for the next step: its own cap, or what is left of the budget if less (at least 5).
cap() { local left=$((BUDGET - (SECONDS - T0))); if ((left < $1)); then echo $((left > 5 ? left : 5)); else echo "$1"; fi; }
elapsed() { echo "$((SECONDS - T0)) s"; }

LINK_MADE=0
cleanup() { if [ "$LINK_MADE" = 1 ]; then rm -f "$ROOT/fastft/kernels"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- toolkit -------------------------------------------------------------------------------------
# A toolkit root holds bin/nvcc and include/cuda_runtime.h. An nvcc on PATH may be a wrapper script
# (/usr/local/bin/nvcc here execs /usr/local/cuda-13.0/bin/nvcc), so each guess is checked.
is_toolkit() { [ -n "$1" ] && [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
if ! is_toolkit "${CUDA_HOME:-}"; then
    CUDA_HOME=
    nvcc_dir=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/x/y)")")")
    for c in /usr/local/cuda "$nvcc_dir" $(ls -d /usr/local/cuda-*/ 2>/dev/null | sort -rV) \
        $("$PY" -c "import nvidia, os; [print(os.path.join(p, d)) for p in nvidia.__path__ for d in os.listdir(p)]" 2>/dev/null); do
        if is_toolkit "${c%/}"; then CUDA_HOME=${c%/}; break; fi
    done
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
unset FASTFT_BACKEND
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

say "== fastft GPU check: $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
say "CUDA_HOME=${CUDA_HOME:-<none found>} nvcc: $("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | tail -n 2 | head -n 1)"

# ---- 1. build ------------------------------------------------------------------------------------
BUILD=failed
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    FASTFT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout -k 10 "$(cap 200)" \
        "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
    rc=$?
    if [ $rc = 0 ] && "$PY" -c "import fastft._C as c; assert c.with_cuda" >>"$OUT/build.log" 2>&1; then
        BUILD=ok
    else
        BUILD="failed (exit $rc; last lines of build.log below); going on with Triton only"
    fi
else
    echo "no nvcc found (set CUDA_HOME)" >"$OUT/build.log"
    BUILD="skipped: no nvcc found; going on with Triton only"
fi
say "build (FASTFT_BUILD_CUDA=1, arch $TORCH_CUDA_ARCH_LIST): $BUILD [$(elapsed)]"
[ "$BUILD" = ok ] || tail -n 15 "$OUT/build.log" | sed 's/^/    /' | tee -a "$SUMMARY"

# ---- fastft.kernels from the source tree -----------------------------------------------------------
if [ ! -e fastft/kernels ] && [ -d kernels ]; then
    ln -s ../kernels fastft/kernels && LINK_MADE=1
fi

# ---- 2. info -------------------------------------------------------------------------------------
say ""
timeout 120 "$PY" -m fastft info 2>&1 | tee -a "$SUMMARY" >"$OUT/bench.log"

# ---- 3. CUDA tests -------------------------------------------------------------------------------
PYTEST_OPTS=(-m cuda -q -p no:cacheprovider)
# pyproject's addopts name pytest-benchmark's flag; without the plugin pytest would refuse to start.
"$PY" -c "import pytest_benchmark" 2>/dev/null || PYTEST_OPTS+=(-o "addopts=-ra")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS+=(--timeout=120)
timeout -k 10 "$(cap 120)" "$PY" -m pytest "${PYTEST_OPTS[@]}" tests >"$OUT/pytest.log" 2>&1
rc=$?
case $rc in
    0) PYTEST="passed" ;;
    5) PYTEST="no tests marked cuda were collected" ;;
    124 | 137) PYTEST="TIMED OUT" ;;
    *) PYTEST="FAILED (exit $rc)" ;;
esac
say ""
say "pytest -m cuda: $PYTEST: $(grep -E '(passed|failed|error|skipped|deselected)' "$OUT/pytest.log" | tail -n 1) [$(elapsed)]"
[ $rc = 0 ] || [ $rc = 5 ] || grep -E '^(FAILED|ERROR)' "$OUT/pytest.log" | head -n 15 | sed 's/^/    /' | tee -a "$SUMMARY"

# ---- 4. GPU benchmarks ---------------------------------------------------------------------------
BT=$(cap 300)
timeout -k 10 "$BT" "$PY" -m benchmarks.run_demo --device cuda --out-dir "$OUT/results" \
    --timeout $((BT > 60 ? BT / 3 : 20)) >>"$OUT/bench.log" 2>&1
rc=$?
say ""
say "benchmarks (run_demo --device cuda): exit $rc$([ $rc = 124 ] && echo ' TIMED OUT') [$(elapsed)]"
for md in "$OUT"/results/*.md; do
    [ -e "$md" ] && sed -n '/^| provider/,$p' "$md" | tee -a "$SUMMARY"
done
# The device runner returns at most 8 files: with more result files than fit beside the 4 logs,
# pack them into one archive.
n=$(find "$OUT/results" -type f | wc -l)
if [ "$n" -gt 4 ]; then
    tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
    say "(results packed into results.tar.gz: $n files)"
fi
say ""
say "== done in $(elapsed); logs: $OUT/{build,pytest,bench}.log, summary.txt"
