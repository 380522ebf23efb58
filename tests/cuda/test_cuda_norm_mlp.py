"""rms_norm and swiglu on CUDA (Triton and CUDA-extension backends) x fp32/bf16/fp16, against fp64 truths by the 2x
rule (tests/cuda/cuda_truth.py): rms_norm in its llama and gemma casting modes (and a frozen weight, and an fp32
weight on half-precision x), swiglu with both or one gradient; at an odd shape (423 x 123) and a Llama-7B one
(hidden 4096, intermediate 11008)."""
import pytest
import torch

import fastft
from fastft.ops import registry
from op_db import OP_DB

from cuda_truth import BACKENDS, DTYPES, compare, compiled_matches_eager, dtype_id

pytestmark = pytest.mark.cuda

ROWS = 423
# name -> (rows, rms_norm hidden size, swiglu width)
SHAPES = {"odd": (ROWS, 123, 123), "llama": (256, 4096, 11008)}

RMS_NORM_OPTIONS = {
    "llama": {},
    "gemma": {"eps": 1e-5, "offset": 1.0, "casting_mode": "gemma"},
}


def _norm_inputs(shape: str, casting_mode: str, weight_grad: bool = True):
    rows, hidden, _ = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(rows, hidden, generator=g, device="cuda") * 3).requires_grad_()
    # Gemma stores the weight around 0 (the scale is 1 + weight); Llama around 1.
    centre = 0.0 if casting_mode == "gemma" else 1.0
    w = (centre + 0.1 * torch.randn(hidden, generator=g, device="cuda")).requires_grad_(weight_grad)
    return x, w


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", list(RMS_NORM_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm(backend, dtype, mode, shape):
    compare(fastft.ops.rms_norm, OP_DB["rms_norm"].truth, _norm_inputs(shape, mode), RMS_NORM_OPTIONS[mode],
            dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_frozen_weight(backend, dtype):
    """Only dx asked for (the kernels skip the dw partials)."""
    compare(fastft.ops.rms_norm, OP_DB["rms_norm"].truth, _norm_inputs("odd", "llama", weight_grad=False), {},
            dtype, backend)


def _with_fp32_weight(fn):
    """fn with the weight kept in fp32 while x is in the tested dtype (Llama's output is then fp32)."""
    return lambda x, w, **kwargs: fn(x, w.float(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_fp32_weight_on_half_x(backend, dtype):
    compare(_with_fp32_weight(fastft.ops.rms_norm), _with_fp32_weight(OP_DB["rms_norm"].truth),
            _norm_inputs("odd", "llama"), {}, dtype, backend)


def _gate_up(shape: str, up_grad: bool = True):
    rows, _, width = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(1)
    gate = (torch.randn(rows, width, generator=g, device="cuda") * 3).requires_grad_()  # both sides of silu's bend
    up = torch.randn(rows, width, generator=g, device="cuda").requires_grad_(up_grad)
    return gate, up


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("grads", ["gate_and_up", "gate_only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu(backend, dtype, grads, shape):
    compare(fastft.ops.swiglu, OP_DB["swiglu"].truth, _gate_up(shape, up_grad=grads == "gate_and_up"), {},
            dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_backend_runs(backend):
    """A forced backend is the one that runs (no silent fall-back to the reference) for both ops' CUDA inputs."""
    x, _ = _norm_inputs("odd", "llama")
    with fastft.backend.use(backend):
        assert registry.get("rms_norm").op.select(x) == backend
        assert registry.get("swiglu").op.select(x) == backend


@pytest.mark.parametrize("mode", list(RMS_NORM_OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_compiled(backend, mode):
    compiled_matches_eager(fastft.ops.rms_norm, _norm_inputs("odd", mode), RMS_NORM_OPTIONS[mode], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_compiled(backend):
    compiled_matches_eager(fastft.ops.swiglu, _gate_up("odd"), {}, backend)
