"""cross_entropy and linear_cross_entropy on CUDA: Triton and CUDA-extension backends x fp32/bf16/fp16 x options,
against fp64 truths by the 2x rule (tests/cuda/cuda_truth.py), at odd shapes (N = 423 tokens, V = 32001, H = 100)."""
import pytest
import torch

import fastft
from op_db import OP_DB

from cuda_truth import BACKENDS, DTYPES, compare, compiled_matches_eager, dtype_id

pytestmark = pytest.mark.cuda

N, V, H = 423, 32001, 100
IGNORE = -100


def _logits():
    g = torch.Generator(device="cuda").manual_seed(0)
    return (torch.randn(N, V, generator=g, device="cuda") * 2).requires_grad_()


def _target(ignore_index: int = IGNORE):
    """Random classes, every 7th token ignore_index."""
    g = torch.Generator(device="cuda").manual_seed(1)
    t = torch.randint(0, V, (N,), generator=g, device="cuda")
    t[::7] = ignore_index
    return t


def _class_weights():
    g = torch.Generator(device="cuda").manual_seed(2)
    return torch.rand(V, generator=g, device="cuda") + 0.5


CE_OPTIONS = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "ignore_index": {"ignore_index": 5},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    "class_weights": {},  # weight passed positionally below
}


@pytest.mark.parametrize("option", list(CE_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy(backend, dtype, option):
    target = _target(CE_OPTIONS[option].get("ignore_index", IGNORE))
    args = (_logits(), target, _class_weights() if option == "class_weights" else None)
    compare(fastft.ops.cross_entropy, OP_DB["cross_entropy"].truth, args, dict(CE_OPTIONS[option]), dtype,
            backend)


def _linear_inputs(with_bias: bool):
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(N, H, generator=g, device="cuda").requires_grad_()
    w = (torch.randn(V, H, generator=g, device="cuda") / H ** 0.5 * 2).requires_grad_()
    kwargs = {}
    if with_bias:
        kwargs["linear_bias"] = (torch.randn(V, generator=g, device="cuda") * 0.1).requires_grad_()
    return x, w, kwargs


LCE_OPTIONS = {
    "mean": {},
    "sum_chunked": {"reduction": "sum", "chunk_size": 128},
    "none_smoothing": {"reduction": "none", "label_smoothing": 0.1},
    "z_loss_softcap": {"z_loss": 1e-4, "softcap": 30.0},
    "bias": {},
}


@pytest.mark.parametrize("option", list(LCE_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy(backend, dtype, option):
    x, w, kwargs = _linear_inputs(with_bias=option == "bias")
    kwargs.update(LCE_OPTIONS[option])
    compare(fastft.ops.linear_cross_entropy, OP_DB["linear_cross_entropy"].truth, (x, w, _target()), kwargs,
            dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_compiled(backend):
    compiled_matches_eager(fastft.ops.cross_entropy, (_logits(), _target()), {"label_smoothing": 0.1}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_compiled(backend):
    x, w, kwargs = _linear_inputs(with_bias=True)
    compiled_matches_eager(fastft.ops.linear_cross_entropy, (x, w, _target()), kwargs, backend)
