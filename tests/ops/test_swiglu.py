"""What is specific to fastft.ops.swiglu / fastft.nn.SwiGLU. Parity on every backend and dtype, opcheck,
torch.compile, bad inputs and a second backward come from the generic suite (tests/ops/test_ops_generic.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import fastft
from fastft.nn import RMSNorm, SwiGLU
from fastft.ops import swiglu
from fastft.ops.defs.swiglu import swiglu_op

BACKENDS = tuple(swiglu_op.backends)


def _use(backend):
    ok, why = swiglu_op.backends[backend].status()
    if not ok:
        pytest.skip(f"{backend}: {why}")
    return fastft.backend.use(backend)


def _tiny_llama_config(**overrides):
    fields = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5)
    return LlamaConfig(**{**fields, **overrides})


# CPU: odd sizes on every backend; CUDA: a Llama-3-8B MLP width on the GPU backends.
CASES = [pytest.param("cpu", backend, (423, 123), id=f"cpu-{backend}-423x123") for backend in BACKENDS] + [
    pytest.param("cuda", backend, (4096, 14336), id=f"cuda-{backend}-4096x14336", marks=pytest.mark.cuda)
    for backend in BACKENDS if backend != "cpp"]


@pytest.mark.parametrize("device,backend,shape", CASES)
def test_bf16_within_twice_torchs_error(device, backend, shape):
    # Gates up to +-40 (sigmoid saturated on both sides): the op's error against an fp64 truth is at most twice
    # eager torch's own bf16 error (plus the rounding of the result).
    gen = torch.Generator(device=device).manual_seed(0)
    gate = (10 * torch.randn(shape, generator=gen, device=device)).clamp(-40, 40).to(torch.bfloat16).requires_grad_()
    up = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16).requires_grad_()
    g = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    wide = [t.detach().double().requires_grad_() for t in (gate, up)]
    truth = F.silu(wide[0]) * wide[1]
    truth_grads = torch.autograd.grad(truth, wide, g.double())
    eager = F.silu(gate) * up
    eager_grads = torch.autograd.grad(eager, (gate, up), g)
    with _use(backend):
        out = swiglu(gate, up)
        grads = torch.autograd.grad(out, (gate, up), g)
    for ours, torchs, exact in zip((out, *grads), (eager, *eager_grads), (truth, *truth_grads)):
        assert ours.dtype == torch.bfloat16
        err = (ours.double() - exact).abs().max().item()
        torch_err = (torchs.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-6 * exact.abs().max().item(), (err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mlp_bias", [False, True])
def test_drop_in_for_a_config_built_llama_mlp(backend, mlp_bias):
    config = _tiny_llama_config(mlp_bias=mlp_bias)
    hf = LlamaMLP(config)
    ours = SwiGLU(config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    x = torch.randn(3, 7, 48, requires_grad=True)
    expected = hf(x)
    g = torch.randn_like(expected)
    hf_grads = torch.autograd.grad(expected, (x, *hf.parameters()), g)
    with _use(backend):
        y = ours(x)
        grads = torch.autograd.grad(y, (x, *ours.parameters()), g)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, hf_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rejects_a_non_silu_config():
    with pytest.raises(ValueError, match="hidden_act"):
        SwiGLU(_tiny_llama_config(hidden_act="gelu"))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_whole_llama_with_fastft_norms_and_mlps(backend):
    # Every LlamaRMSNorm and LlamaMLP of a config-built model swapped for fastft's, weights carried over by
    # state dict: same loss and same gradients for every parameter.
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config()).eval()
    swapped = copy.deepcopy(model)
    config = swapped.config
    for name, module in list(swapped.named_modules()):
        if isinstance(module, (LlamaRMSNorm, LlamaMLP)):
            parent_name, _, attr = name.rpartition(".")
            new = RMSNorm(config.hidden_size, config.rms_norm_eps) if isinstance(module, LlamaRMSNorm) \
                else SwiGLU(config)
            new.load_state_dict(module.state_dict(), strict=True)
            setattr(swapped.get_submodule(parent_name), attr, new)
    assert not any(isinstance(m, (LlamaRMSNorm, LlamaMLP)) for m in swapped.modules())
    ids = torch.randint(0, config.vocab_size, (2, 13))
    loss_hf = model(input_ids=ids, labels=ids).loss
    loss_hf.backward()
    with _use(backend):
        loss = swapped(input_ids=ids, labels=ids).loss
        loss.backward()
    torch.testing.assert_close(loss, loss_hf, rtol=1e-5, atol=1e-6)
    params = dict(swapped.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["gate", "up"])
def test_only_the_gradients_asked_for(backend, frozen):
    gate = torch.randn(423, 123, requires_grad=frozen != "gate")
    up = torch.randn(423, 123, requires_grad=frozen != "up")
    refs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (gate, up)]
    with _use(backend):
        swiglu(gate, up).square().sum().backward()
    (F.silu(refs[0]) * refs[1]).square().sum().backward()
    for ours, ref in zip((gate, up), refs):
        if ref.requires_grad:
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-5)
        else:
            assert ours.grad is None
