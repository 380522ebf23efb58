"""fastft.ops.lora_linear and fastft.nn.LoRALinear: every backend against the fp64 reference."""
import math

import pytest
import torch
from torch import nn

from fastft import backend as fb
from fastft.nn.lora import LoRALinear, lora_scaling
from fastft.kernels.dropout import draw_seed
from fastft.ops.defs.lora import LoRAOptions, dropout_mask, lora_linear, lora_linear_op
from fastft.reference.lora import lora_linear as reference

BACKENDS = ["cpp", "triton", "reference"]
# (leading shape of x, in, out, r): an odd one (the 123 -> 77, r 3), a rounder one, and one that walks
# every tail of the CPU's register-blocked kernels (r = 37: 2 full + 1 partial vector of ranks, 4 + 1 rank
# groups past the 8s; out = 150: 64-wide tiles + a vector + 6 columns; 74 rows: several 16-row tasks + a rest).
SHAPES = [((3, 41), 123, 77, 3), ((64,), 96, 128, 16), ((2, 37), 200, 150, 37)]
INPUTS = ("x", "weight", "bias", "lora_A", "lora_B")


def _usable(name):
    ok, why = fb.status(name)
    if not ok:
        pytest.skip(f"backend {name} unusable: {why}")


def _make(lead, n_in, n_out, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
    b = torch.randn(n_out, generator=g) if bias else None
    a = torch.randn(r, n_in, generator=g) / math.sqrt(n_in)
    bb = torch.randn(n_out, r, generator=g) / math.sqrt(r)
    return [t.to(dtype) if t is not None else None for t in (x, w, b, a, bb)]


def _grads(out, inputs, dy):
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, live, dy)
    it = iter(got)
    return [next(it) if t is not None else None for t in inputs]


def _run(backend, inputs, scaling, p, seed, dy):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    with fb.use(backend):
        y = lora_linear(*leaves, scaling, dropout_p=p, seed=seed)
        grads = _grads(y, leaves, dy)
    return y, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "round", "tails"])
@pytest.mark.parametrize("p,bias", [(0.0, True), (0.25, False)], ids=["nodrop-bias", "drop-nobias"])
def test_matches_reference(backend, dtype, shape, p, bias):
    _usable(backend)
    lead, n_in, n_out, r = shape
    inputs = _make(lead, n_in, n_out, r, dtype, bias)
    scaling = 1.7
    seed = torch.tensor([1234]) if p else None
    mask = dropout_mask(inputs[0], p, seed, backend) if p else None
    dy = torch.randn(*lead, n_out).to(dtype)
    y, grads = _run(backend, inputs, scaling, p, seed, dy)
    assert y.dtype == dtype and y.shape == (*lead, n_out)
    if p:
        kept = float(mask.float().mean())
        assert abs(kept - (1 - p)) < 0.05, kept

    def ref(ins, d):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in ins]
        out = reference(*leaves, scaling, dropout_p=p, dropout_mask=mask.to(d) if mask is not None else None)
        return out, _grads(out, leaves, dy.to(d))

    y64, g64 = ref([t.double() if t is not None else None for t in inputs], torch.float64)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-4)
        for name, a, b in zip(INPUTS, grads, g64):
            if b is not None:
                torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=name)
        return
    # Low precision: error vs the fp64 truth <= 2 x torch's same-dtype error + small atol.
    y_t, g_t = ref(inputs, dtype)
    atol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    err, err_t = (y.double() - y64).abs().max(), (y_t.double() - y64).abs().max()
    assert err <= 2 * err_t + atol, f"y: {err} vs torch {err_t}"
    for name, a, t, b in zip(INPUTS, grads, g_t, g64):
        if b is None:
            continue
        scale = b.abs().max().clamp_min(1.0)
        err, err_t = (a.double() - b).abs().max(), (t.double() - b).abs().max()
        assert err <= 2 * err_t + atol * scale, f"d{name}: {err} vs torch {err_t}"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_frozen_base_gets_no_gradient(backend):
    _usable(backend)
    x, w, b, a, bb = _make((5,), 16, 24, 4, torch.float32)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    with fb.use(backend):
        y = lora_linear(x, w, b, a, bb, 2.0)
        y.sum().backward()
    assert w.grad is None and b.grad is None and x.grad is None
    assert a.grad is not None and bb.grad is not None
    torch.testing.assert_close(bb.grad, 2.0 * torch.ones(5, 24).t() @ (x @ a.detach().t()))


def test_gradcheck_fp64_dropout_uses_forward_mask():
    """Analytic = numerical gradients with dropout only if backward re-draws exactly the forward's mask."""
    _usable("cpp")
    ins = [t.requires_grad_(True) for t in _make((2, 5), 7, 6, 3, torch.float64)]

    def f(*args):
        torch.manual_seed(3)
        with fb.use("cpp"):
            return lora_linear(*args, 0.7, dropout_p=0.4)

    assert torch.autograd.gradcheck(f, tuple(ins))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_dropout_reproducible_under_manual_seed(backend):
    _usable(backend)
    x, w, b, a, bb = _make((8,), 32, 16, 4, torch.float32)
    outs = []
    with fb.use(backend):
        for s in (5, 5, 6):
            torch.manual_seed(s)
            outs.append(lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5))
        plain = lora_linear(x, w, b, a, bb, 1.0)
        evaluated = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=False)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])
    torch.testing.assert_close(evaluated, plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_opcheck_with_dropout(backend):
    """The generic suite opchecks the op without dropout; here the seeded dropout path and its backward op."""
    _usable(backend)
    x, w, b, a, bb = _make((9,), 20, 12, 3, torch.float32)
    for t in (x, a, bb):
        t.requires_grad_(True)
    seed = torch.tensor([11])
    options = LoRAOptions(1.5, 0.2)
    torch.library.opcheck(lora_linear_op.registered,
                          lora_linear_op.registered_args(x, w, b, a, bb, seed, options=options, backend=backend))
    u = x.detach() @ a.detach().t()
    dy = torch.randn(9, 12)
    torch.library.opcheck(lora_linear_op.registered_backward,
                          (dy, x.detach(), w, a.detach(), bb.detach(), u, seed, [True] * 5, 1.5, 0.2, backend))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_compile_fullgraph(backend):
    _usable(backend)
    torch._dynamo.reset()
    x, w, b, a, bb = _make((2, 7), 24, 16, 4, torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)

    def f(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3).square().sum()

    with fb.use(backend):
        torch.manual_seed(0)
        eager = f(x, w, b, a, bb)
        ge = torch.autograd.grad(eager, (x, a, bb))
        torch.manual_seed(1)
        compiled = torch.compile(f, fullgraph=True)(x, w, b, a, bb)
        gc = torch.autograd.grad(compiled, (x, a, bb))
    # Different seeds -> the compiled run's mask differs; without dropout the values must agree.
    assert torch.isfinite(compiled) and all(torch.isfinite(g).all() for g in gc)

    def f0(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, 0.5).square().sum()

    with fb.use(backend):
        e0 = f0(x, w, b, a, bb)
        c0 = torch.compile(f0, fullgraph=True)(x, w, b, a, bb)
        torch.testing.assert_close(c0, e0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(c0, (x, a, bb)), torch.autograd.grad(e0, (x, a, bb)))
    assert len(ge) == len(gc)


def test_fp32_adapters_on_half_base():
    """PEFT keeps adapters in fp32 on a bf16 model: gradients come back in fp32."""
    _usable("cpp")
    x, w, b, a, bb = _make((5,), 16, 8, 4, torch.float32)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = lora_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a, bb, 1.0)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# fastft.nn.LoRALinear
# ------------------------------------------------------------------------------------------------


def test_layer_init_scaling_and_names():
    base = nn.Linear(40, 24)
    layer = LoRALinear(base, r=8, lora_alpha=16)
    assert layer.base_layer is base and layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (40, 24)
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(4, 4), r=4, lora_alpha=8, use_rslora=True).scaling == 4.0 == lora_scaling(4, 8, True)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) bound, PEFT's init of A
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: starts as the base layer
    with pytest.raises(ValueError, match="r "):
        LoRALinear(base, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(base, r=2, lora_dropout=1.5)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=2)


def test_layer_merge_unmerge_round_trip():
    base = nn.Linear(33, 21)
    layer = LoRALinear(base, r=3, lora_alpha=6, lora_dropout=0.1).eval()
    nn.init.normal_(layer.lora_B)
    w0 = base.weight.detach().clone()
    x = torch.randn(7, 33)
    y = layer(x)
    torch.testing.assert_close(layer.get_delta_weight(), 2.0 * layer.lora_B.detach() @ layer.lora_A.detach())
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y)


def test_layer_matches_peft_layer():
    peft = pytest.importorskip("peft")

    holder = nn.Module()
    holder.lin = nn.Linear(30, 20)
    ref = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["lin"])).base_model.model.lin
    base = ref.base_layer
    nn.init.normal_(ref.lora_B["default"].weight)
    layer = LoRALinear.from_parameters(base, ref.lora_A["default"].weight, ref.lora_B["default"].weight,
                                       ref.scaling["default"])
    x = torch.randn(5, 30, requires_grad=True)
    y_ref, y = ref(x), layer(x)
    torch.testing.assert_close(y, y_ref)
    g_ref = torch.autograd.grad(y_ref.square().sum(), (x, ref.lora_A["default"].weight))
    g = torch.autograd.grad(y.square().sum(), (x, layer.lora_A))
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-4)


def test_layer_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(16, 8), r=2, lora_alpha=2, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    train1 = layer(x)
    torch.manual_seed(0)
    train2 = layer(x)
    layer.eval()
    torch.testing.assert_close(train1, train2, rtol=0, atol=0)
    assert not torch.allclose(layer(x), train1)


def test_draw_seed_follows_manual_seed():
    torch.manual_seed(9)
    s1 = draw_seed(torch.device("cpu"))
    torch.manual_seed(9)
    assert torch.equal(s1, draw_seed(torch.device("cpu")))
