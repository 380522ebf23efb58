"""What is specific to fastft.ops.rms_norm / fastft.nn.RMSNorm. Parity on every backend and dtype, opcheck,
torch.compile, bad inputs and a second backward come from the generic suite (tests/ops/test_ops_generic.py)."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

import fastft
from fastft.nn import RMSNorm
from fastft.ops import rms_norm
from op_db import OP_DB
from fastft.ops.defs.rms_norm import rms_norm_op

BACKENDS = tuple(rms_norm_op.backends)


def _use(backend):
    ok, why = rms_norm_op.backends[backend].status()
    if not ok:
        pytest.skip(f"{backend}: {why}")
    return fastft.backend.use(backend)


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at each value of t, in fp64."""
    mag = t.double().abs().clamp_min(torch.finfo(t.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(t.dtype).eps


# CPU: odd sizes on every backend; CUDA: a Llama-sized hidden on the GPU backends.
CASES = [pytest.param("cpu", backend, (423, 123), id=f"cpu-{backend}-423x123") for backend in BACKENDS] + [
    pytest.param("cuda", backend, (8192, 4096), id=f"cuda-{backend}-8192x4096", marks=pytest.mark.cuda)
    for backend in BACKENDS if backend != "cpp"]


@pytest.mark.parametrize("device,backend,shape", CASES)
@pytest.mark.parametrize("casting_mode", ["llama", "gemma"])
def test_bf16_within_twice_torchs_error(device, backend, shape, casting_mode):
    # The op's error against an fp64 truth is at most twice that of the Hugging Face formula run in bf16 (plus the
    # rounding of the result), for y, dx and dw.
    truth_fn = OP_DB["rms_norm"].truth
    gen = torch.Generator(device=device).manual_seed(0)
    x = (3 * torch.randn(shape, generator=gen, device=device)).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[1], generator=gen, device=device)).to(torch.bfloat16).requires_grad_()
    g = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    options = {"offset": 1.0 if casting_mode == "gemma" else 0.0, "casting_mode": casting_mode}
    wide = [t.detach().double().requires_grad_() for t in (x, w)]
    truth = truth_fn(*wide, 1e-5, **options)
    truth_grads = torch.autograd.grad(truth, wide, g.double())
    plain = truth_fn(x, w, 1e-5, **options)
    plain_grads = torch.autograd.grad(plain, (x, w), g)
    with _use(backend):
        y = rms_norm(x, w, 1e-5, **options)
        grads = torch.autograd.grad(y, (x, w), g)
    for ours, torchs, exact in zip((y, *grads), (plain, *plain_grads), (truth, *truth_grads)):
        assert ours.dtype == torchs.dtype
        err = (ours.double() - exact).abs().max().item()
        torch_err = (torchs.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-6 * exact.abs().max().item(), (err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_casting_mode_rounds_like_transformers(backend, dtype):
    # 423 x 123: odd rows and hidden size. Llama rounds the normalised x to the input dtype, then multiplies by
    # the weight and rounds again; Gemma rounds once. On bf16 the two differ on a good share of the elements.
    hf = LlamaRMSNorm(123, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(123))
    x = (3 * torch.randn(423, 123)).to(dtype)
    expected = hf(x)
    with _use(backend):
        llama = rms_norm(x, hf.weight, 1e-5)
        gemma_rounding = rms_norm(x, hf.weight, 1e-5, casting_mode="gemma")
    assert llama.dtype == expected.dtype
    diff = (llama.double() - expected.double()).abs()
    # The fp32 row statistic may differ from torch's in its last bit (summation order), which can move a
    # rounding by one step: at most one ulp anywhere, and rarely.
    assert bool((diff <= _ulp(expected)).all()), f"max diff {diff.max().item()}"
    same_llama = (llama == expected).float().mean().item()
    same_gemma = (gemma_rounding == expected).float().mean().item()
    assert same_llama > 0.99
    assert same_gemma < same_llama - 0.05, (same_gemma, same_llama)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_on_bf16_activations_promotes_like_transformers(backend):
    hf = LlamaRMSNorm(64)  # fp32 weight (a master copy), bf16 activations: transformers returns fp32
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(64))
    x = torch.randn(37, 64).to(torch.bfloat16).requires_grad_()
    expected = hf(x)
    ours = RMSNorm(64)
    ours.load_state_dict(hf.state_dict())
    with _use(backend):
        y = ours(x)
    assert y.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(expected)
    (dx_hf, dw_hf), (dx, dw) = (torch.autograd.grad(out, (x, m.weight), g) for out, m in ((expected, hf), (y, ours)))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(dw, dw_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_hf, rtol=2e-2, atol=2e-2)  # torch rounds dy * w to bf16 on the way; we do not


def _llama_norm():
    config = LlamaConfig(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-5)
    hf = LlamaDecoderLayer(config, layer_idx=0).input_layernorm
    return hf, RMSNorm(config.hidden_size, eps=config.rms_norm_eps), torch.float32


def _gemma_norm():
    return GemmaRMSNorm(123, eps=1e-6), RMSNorm(123, 1e-6, offset=1.0, casting_mode="gemma"), torch.bfloat16


# (transformers module, fastft module, activation dtype), tolerances of (y, dx, dw) as (rtol, atol)
DROP_INS = {
    "llama-fp32": (_llama_norm, ((1e-5, 1e-6), (1e-5, 1e-5), (1e-5, 1e-5))),
    # bf16 output rounded once from fp32 on both sides: 1 ulp apart where the row statistic's last bit differs
    "gemma-bf16": (_gemma_norm, ((8e-3, 1e-6), (1e-2, 1e-3), (1e-5, 1e-5))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DROP_INS))
def test_drop_in_for_transformers_norms(backend, case):
    make, tolerances = DROP_INS[case]
    hf, ours, dtype = make()
    with torch.no_grad():
        hf.weight.add_(0.2 * torch.randn(hf.weight.shape))
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert ours.variance_epsilon == getattr(hf, "variance_epsilon", getattr(hf, "eps", None))
    x = torch.randn(2, 11, hf.weight.shape[0]).to(dtype).requires_grad_()
    expected = hf(x)
    g = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, hf.weight), g)
    with _use(backend):
        y = ours(x)
        grads = torch.autograd.grad(y, (x, ours.weight), g)
    assert y.dtype == expected.dtype
    for got, want, (rtol, atol) in zip((y, *grads), (expected, *expected_grads), tolerances):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_new_module_starts_with_unit_scale():
    assert torch.equal(RMSNorm(8).weight, torch.ones(8))
    assert torch.equal(RMSNorm(8, offset=1.0, casting_mode="gemma").weight, torch.zeros(8))  # as GemmaRMSNorm
    with pytest.raises(ValueError, match="casting_mode"):
        RMSNorm(8, casting_mode="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "input"])
def test_only_the_gradients_asked_for(backend, frozen):
    x = torch.randn(423, 123, requires_grad=frozen != "input")
    w = (1 + 0.1 * torch.randn(123)).requires_grad_(frozen != "weight")
    ref_x, ref_w = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w))
    with _use(backend):
        rms_norm(x, w).square().sum().backward()
    fastft.reference.rms_norm.rms_norm(ref_x, ref_w).square().sum().backward()
    for ours, ref in ((x, ref_x), (w, ref_w)):
        if ref.requires_grad:
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-5)
        else:
            assert ours.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [0, 50])
def test_row_strided_input_and_zero_rows(backend, rows):
    # A [rows, 123] view into [rows, 200] storage (a slice of a fused projection) is read in place, not copied.
    x = torch.randn(rows, 200)[:, :123].requires_grad_()
    w = (1 + 0.1 * torch.randn(123)).requires_grad_()
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(rows, 123)
    with _use(backend):
        y = rms_norm(x, w)
        y.backward(g)
    expected = fastft.reference.rms_norm.rms_norm(ref_x, ref_w)
    expected.backward(g)
    for got, want in ((y, expected), (x.grad, ref_x.grad), (w.grad, ref_w.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
