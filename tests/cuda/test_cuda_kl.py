"""The KL family on CUDA: full_kl, selective_log_softmax, linear_full_kl, linear_selective_log_softmax (log-probs and
entropy) (Triton and CUDA-extension backends) and
kl_penalty (plain torch) x fp32/bf16/fp16 x reductions, mask, temperature, against fp64 truths by the 2x rule
(tests/cuda/cuda_truth.py), at odd shapes (N = 423 tokens, V = 32001, H = 100)."""
import pytest
import torch

import fastft
from op_db import OP_DB

from cuda_truth import BACKENDS, DTYPES, compare, compiled_matches_eager, dtype_id

pytestmark = pytest.mark.cuda

N, V, H, H_REF = 423, 32001, 100, 64


def _pair(grad_ref: bool = False):
    g = torch.Generator(device="cuda").manual_seed(0)
    policy = (torch.randn(N, V, generator=g, device="cuda") * 2).requires_grad_()
    ref = (torch.randn(N, V, generator=g, device="cuda") * 2).requires_grad_(grad_ref)
    return policy, ref


def _mask():
    g = torch.Generator(device="cuda").manual_seed(1)
    return torch.rand(N, generator=g, device="cuda") > 0.3


FULL_KL_OPTIONS = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "mask": {"mask": "MASK"},
    "temperature": {"temperature": 0.7},
    "grad_ref": {},
    # both KL directions from one pass (reverse_weight), gradients to both sides
    "reverse_0.3_none_mask": {"reverse_weight": 0.3, "reduction": "none", "mask": "MASK", "temperature": 0.7},
    "reverse_0.3_mean": {"reverse_weight": 0.3},
    "reverse_1_sum": {"reverse_weight": 1.0, "reduction": "sum"},
}


def _options(table: dict, option: str) -> dict:
    return {k: (_mask() if v == "MASK" else v) for k, v in table[option].items()}


@pytest.mark.parametrize("option", list(FULL_KL_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl(backend, dtype, option):
    grad_ref = option == "grad_ref" or option.startswith("reverse")
    compare(fastft.ops.full_kl, OP_DB["full_kl"].truth, _pair(grad_ref=grad_ref),
            _options(FULL_KL_OPTIONS, option), dtype, backend)


def _index():
    g = torch.Generator(device="cuda").manual_seed(2)
    return torch.randint(0, V, (N,), generator=g, device="cuda")


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (0.7, 3.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_log_softmax(backend, dtype, temperature, softcap):
    logits, _ = _pair()
    compare(fastft.ops.selective_log_softmax, OP_DB["selective_log_softmax"].truth, (logits, _index()),
            {"temperature": temperature, "softcap": softcap}, dtype, backend)


def _heads():
    g = torch.Generator(device="cuda").manual_seed(3)
    hp = torch.randn(N, H, generator=g, device="cuda").requires_grad_()
    wp = (torch.randn(V, H, generator=g, device="cuda") / H ** 0.5 * 2).requires_grad_()
    hr = torch.randn(N, H_REF, generator=g, device="cuda")
    wr = torch.randn(V, H_REF, generator=g, device="cuda") / H_REF ** 0.5 * 2
    return hp, wp, hr, wr


LINEAR_KL_OPTIONS = {
    "mean": {},
    "mask_temperature_chunked": {"mask": "MASK", "temperature": 0.7, "chunk_size": 128},
    "reverse_0.3_mask_chunked": {"mask": "MASK", "chunk_size": 128, "reverse_weight": 0.3},
    "reverse_0.3_none": {"reduction": "none", "reverse_weight": 0.3},
}


@pytest.mark.parametrize("option", list(LINEAR_KL_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_full_kl(backend, dtype, option):
    compare(fastft.ops.linear_full_kl, OP_DB["linear_full_kl"].truth, _heads(),
            _options(LINEAR_KL_OPTIONS, option), dtype, backend)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kl_penalty(dtype, estimator):
    """kl_penalty is plain torch (no backend); checked on CUDA tensors with a mask and the mean reduction."""
    g = torch.Generator(device="cuda").manual_seed(4)
    logprobs = (-torch.rand(N, generator=g, device="cuda") * 5).requires_grad_()
    ref_logprobs = -torch.rand(N, generator=g, device="cuda") * 5
    compare(fastft.ops.kl_penalty, OP_DB["kl_penalty"].truth, (logprobs, ref_logprobs),
            {"estimator": estimator, "mask": _mask(), "reduction": "mean"}, dtype, backend=None)


def _logp_and_entropy(fn):
    """fn(..., return_entropy=True) as one [2, ...] output, so one comparison checks both and both gradients."""
    return lambda *args, **kwargs: torch.stack(fn(*args, return_entropy=True, **kwargs))


def _head_with_masked_vocabulary():
    hp, wp, _, _ = _heads()
    g = torch.Generator(device="cuda").manual_seed(6)
    bias = (torch.randn(V, generator=g, device="cuda") * 0.3).requires_grad_()
    with torch.no_grad():
        bias[::11] = -float("inf")  # masked vocabulary entries: finite logp / entropy / gradients
    target = _index()
    target[target % 11 == 0] += 1
    target[::5] = -100
    return hp, wp, target, bias


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_selective_log_softmax_with_entropy(backend, dtype, softcap):
    """softcap 2: the cap bends logits of a few units (the -inf bias entries cap to -2, as in torch)."""
    hp, wp, target, bias = _head_with_masked_vocabulary()
    compare(_logp_and_entropy(fastft.ops.linear_selective_log_softmax),
            _logp_and_entropy(OP_DB["linear_selective_log_softmax"].truth), (hp, wp, target),
            {"bias": bias, "temperature": 0.8, "chunk_size": 128, "softcap": softcap}, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_selective_log_softmax_compiled(backend):
    hp, wp, target, bias = _head_with_masked_vocabulary()
    compiled_matches_eager(_logp_and_entropy(fastft.ops.linear_selective_log_softmax), (hp, wp, target),
                           {"bias": bias, "chunk_size": 128}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_compiled(backend):
    compiled_matches_eager(fastft.ops.full_kl, _pair(), {"mask": _mask()}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_reverse_weight_compiled(backend):
    compiled_matches_eager(fastft.ops.full_kl, _pair(grad_ref=True), {"mask": _mask(), "reverse_weight": 0.3},
                           backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_log_softmax_compiled(backend):
    logits, _ = _pair()
    compiled_matches_eager(fastft.ops.selective_log_softmax, (logits, _index()), {"temperature": 0.7}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_full_kl_compiled(backend):
    compiled_matches_eager(fastft.ops.linear_full_kl, _heads(), {"chunk_size": 128}, backend)


def test_kl_penalty_compiled():
    g = torch.Generator(device="cuda").manual_seed(5)
    logprobs = (-torch.rand(N, generator=g, device="cuda") * 5).requires_grad_()
    ref_logprobs = -torch.rand(N, generator=g, device="cuda") * 5
    compiled_matches_eager(fastft.ops.kl_penalty, (logprobs, ref_logprobs), {"reduction": "mean"}, backend=None)
