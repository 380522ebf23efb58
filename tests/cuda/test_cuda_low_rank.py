"""lora_linear and adapter on CUDA: Triton and CUDA-extension backends x fp32/bf16/fp16 x bias or none, frozen or
trainable weights, activations and seeded dropout, against fp64 truths by the 2x rule (tests/cuda/cuda_truth.py),
at odd shapes (N = 423 tokens, H = 100, r = 37). With dropout the truth is the reference with the mask of
fastft/reference/dropout.py for the same seed: every backend must drop the same elements."""
import pytest
import torch

import fastft
from fastft.kernels import dropout as kernel_dropout
from op_db import OP_DB
from fastft.reference import adapter as ref_adapter
from fastft.reference import lora as ref_lora

from cuda_truth import BACKENDS, DTYPES, compare, compiled_matches_eager, dtype_id

pytestmark = pytest.mark.cuda

N, H, OUT, R = 423, 100, 257, 37


def _lora_inputs(with_bias: bool, trainable_base: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, N // 3, H, generator=g, device="cuda").requires_grad_()
    w = (torch.randn(OUT, H, generator=g, device="cuda") / H ** 0.5).requires_grad_(trainable_base)
    b = (torch.randn(OUT, generator=g, device="cuda") * 0.1).requires_grad_(trainable_base) if with_bias else None
    a = (torch.randn(R, H, generator=g, device="cuda") / H ** 0.5).requires_grad_()
    bb = (torch.randn(OUT, R, generator=g, device="cuda") * 0.2).requires_grad_()
    return x, w, b, a, bb


@pytest.mark.parametrize("trainable_base", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear(backend, dtype, with_bias, trainable_base):
    args = (*_lora_inputs(with_bias, trainable_base), 2.0)
    compare(fastft.ops.lora_linear, OP_DB["lora_linear"].truth, args, {}, dtype, backend)


def _lora_with_mask(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p, seed):
    return ref_lora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_seeded_dropout(backend, dtype):
    args = (*_lora_inputs(with_bias=True, trainable_base=False), 2.0)
    kwargs = {"dropout_p": 0.1, "seed": torch.tensor([12345], dtype=torch.int64, device="cuda")}
    compare(fastft.ops.lora_linear, _lora_with_mask, args, kwargs, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_dropout_mask_is_the_reference_mask(backend):
    from fastft.ops.defs import lora as lora_ops
    from fastft.reference import dropout as ref_dropout

    seed = torch.tensor([2**40 + 7], dtype=torch.int64, device="cuda")
    like = torch.empty(N, H, device="cuda")
    mask = lora_ops.dropout_mask(like, 0.3, seed, backend)
    expected = ref_dropout.dropout_keep(seed, N, H, ref_dropout.drop_threshold(0.3))
    torch.testing.assert_close(mask.bool(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_compiled(backend):
    args = (*_lora_inputs(with_bias=True, trainable_base=False), 2.0)
    compiled_matches_eager(fastft.ops.lora_linear, args, {}, backend)


def _adapter_inputs(with_biases: bool, trainable_down: bool = True):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(N, H, generator=g, device="cuda").requires_grad_()
    wd = (torch.randn(R, H, generator=g, device="cuda") / H ** 0.5).requires_grad_(trainable_down)
    bd = (torch.randn(R, generator=g, device="cuda") * 0.1).requires_grad_(trainable_down) if with_biases else None
    wu = (torch.randn(H, R, generator=g, device="cuda") / R ** 0.5).requires_grad_()
    bu = (torch.randn(H, generator=g, device="cuda") * 0.1).requires_grad_() if with_biases else None
    return x, wd, bd, wu, bu


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter(backend, dtype, activation):
    compare(fastft.ops.adapter, OP_DB["adapter"].truth, _adapter_inputs(with_biases=True),
            {"activation": activation, "scale": 0.5}, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_no_biases_frozen_down(backend, dtype):
    compare(fastft.ops.adapter, OP_DB["adapter"].truth, _adapter_inputs(with_biases=False, trainable_down=False),
            {"activation": "gelu"}, dtype, backend)


class _SeededAdapter:
    """fastft.ops.adapter draws its dropout seed from the default generator: re-seeding that generator before each
    call makes the op draw ``seed`` (kernels/dropout.draw_seed), which the reference then gets explicitly."""

    def __init__(self, generator_seed: int):
        self.generator_seed = generator_seed
        torch.manual_seed(generator_seed)
        self.seed = kernel_dropout.draw_seed(torch.device("cuda"))

    def op(self, *args, **kwargs):
        torch.manual_seed(self.generator_seed)
        return fastft.ops.adapter(*args, **kwargs)

    def truth(self, *args, **kwargs):
        return ref_adapter.adapter(*args, **kwargs, seed=self.seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_seeded_dropout(backend, dtype):
    seeded = _SeededAdapter(generator_seed=77)
    compare(seeded.op, seeded.truth, _adapter_inputs(with_biases=True), {"activation": "silu", "dropout_p": 0.2},
            dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_compiled(backend):
    compiled_matches_eager(fastft.ops.adapter, _adapter_inputs(with_biases=True), {"activation": "gelu"}, backend)
