"""fastft.ops.adapter / fastft.nn.Adapter against the eager block, on every backend."""
import pytest
import torch
import torch.nn.functional as F

from fastft import backend
from fastft.nn.adapter import Adapter
from fastft.ops.defs.adapter import ACTIVATIONS, AdapterOptions, adapter, adapter_op
from fastft.reference import adapter as ref

BACKENDS = ["cpp", "triton", "reference"]
# odd, > one C++ row block, r = 1, and r = 72 / H = 100 (every tail of the CPU's register-blocked kernels)
SHAPES = [((3, 37, 48), 13), ((130, 64), 16), ((2, 5, 24), 1), ((2, 33, 100), 72)]


def _params(hidden, r, dtype=torch.float32, bias=True, std=0.2):
    g = torch.Generator().manual_seed(1)
    wd = (torch.randn(r, hidden, generator=g) * std).to(dtype).requires_grad_()
    wu = (torch.randn(hidden, r, generator=g) * std).to(dtype).requires_grad_()
    bd = torch.randn(r, generator=g).to(dtype).requires_grad_() if bias else None
    bu = torch.randn(hidden, generator=g).to(dtype).requires_grad_() if bias else None
    return wd, bd, wu, bu


def _eager(x, wd, bd, wu, bu, activation, scale, keep=None, keep_scale=1.0):
    h = ref.activation_fn(activation, F.linear(x, wd, bd))
    if keep is not None:
        h = h * keep.to(h.dtype) * keep_scale
    return x + scale * F.linear(h, wu, bu)


def _run(fn, x, params, upstream, **kw):
    y = fn(x, *params, **kw)
    leaves = [x] + [p for p in params if p is not None]
    grads = torch.autograd.grad(y, leaves, upstream)
    return [y.detach()] + list(grads)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,r", SHAPES)
def test_fp32_matches_eager_without_dropout(be, activation, shape, r):
    x = torch.randn(shape, requires_grad=True)
    params = _params(shape[-1], r)
    up = torch.randn(shape)
    with backend.use(be):
        got = _run(adapter, x, params, up, activation=activation, scale=0.7)
    eager = _run(lambda x, *p, **kw: _eager(x, *p, activation, 0.7), x, params, up)
    params64 = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    truth = _run(lambda x, *p, **kw: _eager(x, *p, activation, 0.7), x.detach().double().requires_grad_(), params64,
                 up.double())
    # fp32 vs the fp64 truth: within 2x eager fp32's own error + 1e-5 (both round; their sums differ in order).
    for name, g, e, t in zip(("y", "dx", "dWd", "dbd", "dWu", "dbu"), got, eager, truth):
        err, err_eager = (g.double() - t).abs().max(), (e.double() - t).abs().max()
        assert err <= 2 * err_eager + 1e-5, f"{name}: {err} vs eager {err_eager}"


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_dropout_matches_eager_with_same_mask(be, activation):
    shape, r, p = (3, 37, 48), 13, 0.3
    x = torch.randn(shape, requires_grad=True)
    params = _params(shape[-1], r)
    up = torch.randn(shape)
    torch.manual_seed(123)
    with backend.use(be):
        got = _run(adapter, x, params, up, activation=activation, dropout_p=p, scale=1.3)
    torch.manual_seed(123)
    seed = ref.draw_seed(x.device)  # the functional draws its seed first, from the same generator state
    t = ref.drop_threshold(p)
    keep = ref.dropout_keep(seed, 3 * 37, r, t).reshape(3, 37, r)
    assert 0.2 < 1 - keep.float().mean() < 0.4
    want = _run(lambda x, *pp: _eager(x, *pp, activation, 1.3, keep, ref.keep_scale(t)), x, params, up)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_dropout_reproducible_and_eval_never_drops(be):
    x = torch.randn(4, 9, 32)
    params = [p.detach() for p in _params(32, 8)]
    with backend.use(be):
        torch.manual_seed(7)
        a = adapter(x, *params, dropout_p=0.5)
        torch.manual_seed(7)
        b = adapter(x, *params, dropout_p=0.5)
        c = adapter(x, *params, dropout_p=0.5)
        e1 = adapter(x, *params, dropout_p=0.5, training=False)
        e2 = adapter(x, *params, dropout_p=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    torch.testing.assert_close(e1, _eager(x, *params, "relu", 1.0), rtol=1e-5, atol=1e-5)


def test_dropout_mask_identical_across_backends():
    x = torch.randn(300, 40)
    params = [p.detach() for p in _params(40, 24)]
    outs = []
    for be in BACKENDS:
        torch.manual_seed(3)
        with backend.use(be):
            outs.append(adapter(x, *params, dropout_p=0.25))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


def test_dropout_statistics():
    keep = ref.dropout_keep(torch.tensor(987654321), 2000, 64, ref.drop_threshold(0.1))
    frac = 1 - keep.float().mean().item()
    assert abs(frac - 0.1) < 0.005
    # rows and columns are not correlated: every column drops about p, consecutive rows differ
    col = 1 - keep.float().mean(0)
    assert col.min() > 0.06 and col.max() < 0.14
    assert (keep[1:] != keep[:-1]).float().mean() > 0.1


@pytest.mark.parametrize("be", ["cpp", "reference"])
def test_gradcheck_float64_with_seeded_dropout(be):
    x = torch.randn(2, 11, 10, dtype=torch.float64, requires_grad=True)
    params = _params(10, 6, torch.float64, std=0.5)

    def fn(x, wd, bd, wu, bu):
        torch.manual_seed(11)  # same seed each call -> same mask
        with backend.use(be):
            return adapter(x, wd, bd, wu, bu, activation="gelu", dropout_p=0.3, scale=0.9)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("be", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])  # gelu and silu: the generic suite's samples
def test_low_precision_within_twice_torch_error(be, dtype, activation):
    shape, r = (2, 67, 96), 16
    x32 = torch.randn(shape)
    p32 = [p.detach() for p in _params(96, r)]
    up32 = torch.randn(shape)
    x64 = x32.double().requires_grad_()
    truth = _run(lambda x, *p: _eager(x, *p, activation, 0.5), x64, [p.double().requires_grad_() for p in p32],
                 up32.double())
    xl = x32.to(dtype).requires_grad_()
    pl = [p.to(dtype).requires_grad_() for p in p32]
    torch_low = _run(lambda x, *p: _eager(x, *p, activation, 0.5), xl, pl, up32.to(dtype))
    with backend.use(be):
        ours = _run(adapter, xl, pl, up32.to(dtype), activation=activation, scale=0.5)
    names = ["y", "dx", "dwd", "dbd", "dwu", "dbu"]
    for name, o, t, w in zip(names, ours, torch_low, truth):
        err = (o.double() - w).abs().max().item()
        torch_err = (t.double() - w).abs().max().item()
        atol = 1e-4 * max(1.0, w.abs().max().item())  # small, relative to the output's scale
        assert err <= 2 * torch_err + atol, (name, err, torch_err)


@pytest.mark.parametrize("be", ["cpp", "triton"])
def test_frozen_input_and_no_bias(be):
    x = torch.randn(5, 33)
    wd, _, wu, _ = _params(33, 7, bias=False)
    up = torch.randn(5, 33)
    with backend.use(be):
        y = adapter(x, wd, None, wu, None, activation="silu")
        gwd, gwu = torch.autograd.grad(y, [wd, wu], up)
    wd2, wu2 = wd.detach().requires_grad_(), wu.detach().requires_grad_()
    y2 = _eager(x, wd2, None, wu2, None, "silu", 1.0)
    e_wd, e_wu = torch.autograd.grad(y2, [wd2, wu2], up)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gwd, e_wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gwu, e_wu, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    x = torch.randn(0, 16, requires_grad=True)
    params = _params(16, 4)
    y = adapter(x, *params, dropout_p=0.1)
    y.sum().backward()
    assert y.shape == (0, 16)
    assert torch.count_nonzero(params[0].grad) == 0


@pytest.mark.parametrize("be", ["cpp", "triton"])
def test_opcheck_with_dropout(be):
    """The generic suite opchecks the op without dropout; here the seeded dropout path and its backward op."""
    x = torch.randn(37, 24, requires_grad=True)
    wd, bd, wu, bu = _params(24, 8)
    seed = torch.tensor([1234], dtype=torch.int64)
    options = AdapterOptions(1, ref.drop_threshold(0.2), 0.5)
    torch.library.opcheck(adapter_op.registered,
                          adapter_op.registered_args(x, wd, bd, wu, bu, seed, options=options, backend=be))
    pre = torch.randn(37, 8)
    g = torch.randn(37, 24)
    torch.library.opcheck(adapter_op.registered_backward,
                          (g, x.detach(), wd.detach(), wu.detach(), pre, seed, True, True, True, True, True,
                           3, options.drop_threshold, 0.5, be))


@pytest.mark.parametrize("be", ["cpp", "triton"])
def test_torch_compile_fullgraph(be):
    torch._dynamo.reset()
    x = torch.randn(2, 19, 32, requires_grad=True)
    params = _params(32, 8)

    def block(x, wd, bd, wu, bu):
        return adapter(x, wd, bd, wu, bu, activation="gelu_tanh", scale=0.5)

    with backend.use(be):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        got = _run(compiled, x, params, torch.ones(2, 19, 32))
        want = _run(block, x, params, torch.ones(2, 19, 32))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_module_init_near_identity_and_trains():
    torch.manual_seed(0)
    m = Adapter(32, adapter_size=8, activation="relu", dropout=0.1)
    assert m.down.weight.std() < 0.02 and m.up.weight.std() < 0.02
    assert torch.count_nonzero(m.down.bias) == 0 and torch.count_nonzero(m.up.bias) == 0
    x = torch.randn(4, 32)
    m.eval()
    assert (m(x) - x).abs().max() < 0.05
    m.train()
    y = m(x)
    y.square().sum().backward()
    assert m.up.weight.grad is not None and m.down.weight.grad.abs().sum() > 0


def test_module_casts_fp32_params_to_input_dtype():
    m = Adapter(16, 4, dropout=0.0)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.up.weight.grad.dtype == torch.float32


def test_module_bad_arguments():
    """The functional's bad inputs are declared in tests/ops/op_db.py (run by tests/ops/test_ops_generic.py)."""
    with pytest.raises(ValueError, match="adapter_size"):
        Adapter(16, 0)
    with pytest.raises(ValueError, match="unknown activation"):
        Adapter(16, 4, activation="swish2")
    with pytest.raises(ValueError, match="hidden size mismatch"):
        Adapter(16, 4)(torch.randn(2, 8))


@pytest.mark.parametrize("r,bias", [(13, True), (16, True), (16, False), (5, False)])
def test_triton_bottleneck_rows_padded_to_8(monkeypatch, r, bias):
    # The up-projection GEMM's operands h and [W_up | b_up] had r + 1 columns (65: 130-byte bf16 rows, no aligned
    # vector loads or TMA). Now both rows are padded with zeros to a multiple of 8 elements; values unchanged.
    if not adapter_op.backends["triton"].status()[0]:
        pytest.skip("triton unusable")
    hidden = 40
    x = torch.randn(2, 7, hidden, requires_grad=True)
    params = _params(hidden, r, bias=bias)
    upstream = torch.randn(2, 7, hidden)
    real_addmm = torch.addmm
    operands = []

    def recording_addmm(input, mat1, mat2, **kw):
        operands.append((mat1.detach().clone(), mat2.detach().clone()))
        return real_addmm(input, mat1, mat2, **kw)

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    with backend.use("triton"):
        ours = _run(adapter, x, params, upstream, activation="gelu", scale=0.7)
    monkeypatch.undo()
    expected = _run(lambda *a, **k: _eager(*a, activation="gelu", scale=0.7), x, params, upstream)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    h, up_t = next((m1, m2) for m1, m2 in operands if m1.shape[0] == x.numel() // hidden and m2.shape[1] == hidden)
    width = h.shape[1]
    assert width % 8 == 0 and width - r - int(bias) < 8, (r, bias, width)
    assert h.stride(0) % 8 == 0 and up_t.t().stride(0) % 8 == 0
    assert torch.count_nonzero(h[:, r + int(bias):]) == 0 and torch.count_nonzero(up_t[r + int(bias):]) == 0
    if bias:
        assert torch.equal(h[:, r], torch.ones(h.shape[0]))
