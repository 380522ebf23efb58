"""fastft.ops.cross_entropy on every backend against torch and the fp64 reference.

Shapes are small for the Triton interpreter, plus the odd shape N=423, V=32001. Low precision
follows the 2x-torch-error rule (docs/ARCHITECTURE.md, "Tests"): error vs an fp64 truth <= 2 x torch's own same-dtype error + atol.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastft
from fastft import backend as fb
from fastft.nn import CrossEntropyLoss
from fastft.ops import cross_entropy
from fastft.reference.cross_entropy import cross_entropy as reference

CPU_BACKENDS = [b for b in ("reference", "cpp", "triton") if fb.status(b)[0]]
KERNEL_BACKENDS = [b for b in ("cpp", "triton") if fb.status(b)[0]]
REDUCTIONS = ("mean", "sum", "none")


def make_inputs(shape, num_classes, dtype=torch.float32, ignore_frac=0.25, scale=3.0, ignore_index=-100):
    x = (torch.randn(*shape, num_classes) * scale).to(dtype)
    t = torch.randint(0, num_classes, shape)
    t[torch.rand(shape) < ignore_frac] = ignore_index
    return x, t


def run(backend, x, t, upstream=None, **kw):
    """Loss and input gradient through fastft on one backend."""
    x = x.detach().clone().requires_grad_()
    with fb.use(backend):
        loss = cross_entropy(x, t, **kw)
    g = upstream if upstream is not None else torch.ones_like(loss)
    loss.backward(g)
    return loss.detach(), x.grad


def truth(x, t, upstream=None, weight=None, **kw):
    """fp64 reference loss and gradient."""
    xd = x.detach().double().requires_grad_()
    loss = reference(xd, t, None if weight is None else weight.double(), **kw)
    g = upstream.double() if upstream is not None else torch.ones_like(loss)
    loss.backward(g)
    return loss.detach(), xd.grad


def torch_same_dtype(x, t, upstream=None, **kw):
    x = x.detach().clone().requires_grad_()
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1), **kw)
    if kw.get("reduction") == "none":
        loss = loss.reshape(t.shape)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), x.grad


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------------------
# fp32 parity with torch, every option torch shares
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(37,), (3, 7)], ids=["2d", "3d"])
def test_matches_torch_fp32(backend, reduction, weighted, label_smoothing, shape):
    V = 1003 if len(shape) == 1 else 129
    x, t = make_inputs(shape, V)
    weight = torch.rand(V) + 0.1 if weighted else None
    upstream = torch.randn(shape) if reduction == "none" else torch.tensor(0.7)
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    loss, grad = run(backend, x, t, upstream, **kw)
    ref_loss, ref_grad = torch_same_dtype(x, t, upstream, **kw)
    assert loss.shape == ref_loss.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "extras",
    [dict(z_loss=1e-3), dict(softcap=5.0), dict(z_loss=1e-2, softcap=2.0, label_smoothing=0.2), dict(ignore_index=3)],
    ids=["z", "softcap", "z+softcap+smooth", "ignore3"],
)
def test_extras_vs_reference_fp32(backend, reduction, extras):
    V = 257
    ignore_index = extras.get("ignore_index", -100)
    x, t = make_inputs((29,), V, ignore_index=ignore_index)
    weight = torch.rand(V) + 0.1
    upstream = torch.randn(29) if reduction == "none" else torch.tensor(1.3)
    loss, grad = run(backend, x, t, upstream, weight=weight, reduction=reduction, **extras)
    ref_loss, ref_grad = truth(x, t, upstream, weight=weight, reduction=reduction, **extras)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_large_shape(backend):
    """N=423, V=32001: tails of every vector/tile loop, several tiles per row."""
    N, V = 423, 32001
    x, t = make_inputs((N,), V)
    weight = torch.rand(V) + 0.5
    kw = dict(weight=weight, label_smoothing=0.05)
    loss, grad = run(backend, x, t, **kw)
    ref_loss, ref_grad = torch_same_dtype(x, t, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Low precision: <= 2 x torch's own same-dtype error vs an fp64 truth
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, weighted=True)], ids=["plain", "smooth+w"])
def test_low_precision_rule(backend, dtype, reduction, options):
    V = 1003
    x, t = make_inputs((41,), V, dtype=dtype)
    options = dict(options)
    weight = torch.rand(V) + 0.1 if options.pop("weighted", False) else None
    upstream = torch.randn(41) if reduction == "none" else torch.tensor(1.0)
    kw = dict(weight=weight, reduction=reduction, **options)
    loss, grad = run(backend, x, t, upstream.to(dtype), **kw)
    t_loss, t_grad = truth(x, t, upstream, **kw)
    w_lp = None if weight is None else weight.to(dtype)
    p_loss, p_grad = torch_same_dtype(x, t, upstream.to(dtype), **{**kw, "weight": w_lp})
    assert loss.dtype == dtype and grad.dtype == dtype
    atol = 1e-6
    assert err(loss, t_loss) <= 2 * err(p_loss, t_loss) + atol + 1e-3 * t_loss.abs().max().item() * (dtype == torch.bfloat16)
    assert err(grad, t_grad) <= 2 * err(p_grad, t_grad) + atol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_extras_accurate_to_fp32_math(backend, dtype):
    """z-loss and softcap have no torch peer: the loss must be the fp64 truth rounded to the dtype."""
    x, t = make_inputs((33,), 517, dtype=dtype)
    kw = dict(reduction="none", z_loss=1e-3, softcap=4.0, label_smoothing=0.1)
    loss, grad = run(backend, x, t, **kw)
    t_loss, t_grad = truth(x, t, **kw)
    ulp = torch.finfo(dtype).eps
    assert (loss.double() - t_loss).abs().max() <= ulp * t_loss.abs().max() + 1e-6
    assert (grad.double() - t_grad).abs().max() <= ulp * t_grad.abs().max() + 1e-6


# ------------------------------------------------------------------------------------------------
# Edge cases and documented behaviour
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero_not_nan(backend, reduction):
    x = torch.randn(6, 50)
    t = torch.full((6,), -100)
    loss, grad = run(backend, x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.isnan(F.cross_entropy(x, t)).item()  # the documented difference from torch


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_extreme_logits_stay_finite(backend, softcap):
    x = torch.randn(8, 100) * 1e4
    t = torch.randint(0, 100, (8,))
    loss, grad = run(backend, x, t, softcap=softcap, z_loss=1e-4, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = truth(x, t, softcap=softcap, z_loss=1e-4, reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_upstream_gradient_scales_fused_gradient(backend):
    x, t = make_inputs((20,), 77)
    xa = x.clone().requires_grad_()
    with fb.use(backend):
        (cross_entropy(xa, t) * 3.0).backward()
    _, ref_grad = truth(x, t, upstream=torch.tensor(3.0))
    torch.testing.assert_close(xa.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_retained_graph_scales_each_backward_by_its_own_upstream(backend):
    """The fused gradient is kept unscaled while the graph is retained: grads add up as base * (g1 + g2)."""
    x, t = make_inputs((5,), 11)
    xa = x.detach().clone().requires_grad_()
    with fb.use(backend):
        loss = cross_entropy(xa, t)
    loss.backward(torch.tensor(3.0), retain_graph=True)
    loss.backward(torch.tensor(-0.5))
    _, ref_grad = truth(x, t, upstream=torch.tensor(2.5))
    torch.testing.assert_close(xa.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_class_weights_mean_matches_torch(backend):
    """torch's OpInfo sample: weights [-8.48, -1.77, -4.32], targets [0, 0], mean -> 6.401 in torch. "No
    counted row -> 0" is about the count of counted rows, not the sign of the weight sum."""
    x = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]], requires_grad=True)
    t = torch.tensor([0, 0])
    w = torch.tensor([-8.48, -1.77, -4.32])
    want = F.cross_entropy(x, t, w)
    (want_grad,) = torch.autograd.grad(want, x)
    with fb.use(backend):
        got = cross_entropy(x, t, w)
    (got_grad,) = torch.autograd.grad(got, x)
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_forward_and_noncontiguous_int32(backend):
    base = torch.randn(40, 90)
    x = base[::2, 5:69]  # row stride 180, last dim contiguous
    t = torch.randint(0, 64, (20,), dtype=torch.int32)
    t[3] = -100
    with torch.no_grad(), fb.use(backend):
        loss = cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(x, t.long(), reduction="none"), rtol=1e-5, atol=1e-5)
    xt = base.t()[:64]  # last dim not contiguous
    tt = torch.randint(0, 40, (64,))
    with fb.use(backend):
        torch.testing.assert_close(cross_entropy(xt, tt), F.cross_entropy(xt, tt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_and_broadcast_targets(backend):
    """A target that is a view with strides (labels[:, ::2], an expanded scalar) reads as its values."""
    x = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 12))
    labels[0, 2] = -100
    for t in (labels[:, ::2], torch.tensor(3).expand(4, 6)):
        with fb.use(backend):
            got = cross_entropy(x, t, reduction="none")
            want = cross_entropy(x, t.contiguous(), reduction="none")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got, F.cross_entropy(x.transpose(1, 2), t, reduction="none"), rtol=1e-5, atol=1e-5)


def test_class_weights_that_require_grad_are_refused():
    """Not differentiable with respect to the class weights (as torch): an error, not a silent None."""
    x, t = make_inputs((8,), 5)
    w = torch.rand(5, requires_grad=True)
    with pytest.raises(TypeError, match="weight \\(class weights\\) requires grad"):
        cross_entropy(x.requires_grad_(), t, w)
    with torch.no_grad():
        cross_entropy(x, t, w)  # no graph: fine
    cross_entropy(x, t, w.detach())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend):
    """Gradients come from saved tensors: create_graph=True must raise, not silently drop the
    second-order terms (a gradient penalty through the loss would otherwise be wrong)."""
    x, t = make_inputs((8,), 5)
    x.requires_grad_()
    with fb.use(backend), pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(cross_entropy(x, t), x, create_graph=True)
    with fb.use(backend):
        (g,) = torch.autograd.grad(cross_entropy(x, t), x)  # first order is fine
    assert g.abs().sum() > 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grad_kept_by_user_is_not_overwritten_by_next_step(backend):
    """The CPU gradient buffer is reused across steps only once nothing references it."""
    x1, t = make_inputs((16,), 300)
    x1.requires_grad_()
    with fb.use(backend):
        cross_entropy(x1, t).backward()
        kept = x1.grad  # held by the user
        snapshot = kept.clone()
        x2 = torch.randn_like(x1, requires_grad=True)
        cross_entropy(x2, t).backward()
    assert torch.equal(kept, snapshot)
    assert not torch.equal(x2.grad, kept)


def test_cpp_float64_is_exact():
    """fp64 runs in fp64 on the C++ backend: gradcheck the per-token path, and the fused (mean/sum)
    gradient against the fp64 reference to 1e-12."""
    if not fb.status("cpp")[0]:
        pytest.skip(fb.status("cpp")[1])
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 8, 2, 1])
    w = torch.rand(9, dtype=torch.float64)
    kw = dict(label_smoothing=0.2, z_loss=0.01, softcap=3.0)
    with fb.use("cpp"):
        assert torch.autograd.gradcheck(lambda x: cross_entropy(x, t, w, reduction="none", **kw), (x,))
        for reduction in ("mean", "sum"):
            loss, grad = run("cpp", x, t, torch.tensor(0.3, dtype=torch.float64), weight=w, reduction=reduction, **kw)
            ref_loss, ref_grad = truth(x, t, torch.tensor(0.3, dtype=torch.float64), weight=w, reduction=reduction, **kw)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------


def test_opcheck_cpp_kernels():
    if not fb.status("cpp")[0]:
        pytest.skip(fb.status("cpp")[1])
    x, t = make_inputs((9,), 50)
    ops = torch.ops.fastft
    opcheck(ops.cross_entropy_fwd_kernel.default, (x, t, None, torch.tensor(0.5), -100, 0.1, 0.0, 0.0), test_utils=("test_schema",))
    opcheck(ops.scale_if_not_one_kernel_.default, (torch.randn(3, 4), torch.tensor(2.0)), test_utils=("test_schema",))


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "cpp"])  # cpp: the generic suite
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_fullgraph_matches_eager(backend, reduction):
    x, t = make_inputs((2, 9), 64)
    upstream = torch.rand(2, 9) if reduction == "none" else torch.tensor(0.5)

    def loss_fn(x, t):
        return cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)

    torch._dynamo.reset()
    with fb.use(backend):
        compiled_loss, compiled_grad = run_fn(torch.compile(loss_fn, fullgraph=True), x, t, upstream)
        eager_loss, eager_grad = run_fn(loss_fn, x, t, upstream)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-7)


def run_fn(fn, x, t, upstream):
    x = x.clone().requires_grad_()
    loss = fn(x, t)
    loss.backward(upstream)
    return loss.detach(), x.grad


# ------------------------------------------------------------------------------------------------
# Bad input (the functional's: its entry in tests/ops/op_db.py, run by tests/ops/test_ops_generic.py)
# ------------------------------------------------------------------------------------------------


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown fastft backend"):
        with fb.use("tpu"):
            pass


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------


def test_module_is_a_drop_in_for_torch():
    w = torch.rand(40) + 0.1
    ours = CrossEntropyLoss(weight=w, ignore_index=-1, label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=-1, label_smoothing=0.05)
    x, t = make_inputs((12,), 40, ignore_index=-1)
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-5, atol=1e-6)
    assert "weight" in ours.state_dict()
    assert "label_smoothing=0.05" in repr(ours)
    assert fastft.nn.CrossEntropyLoss is CrossEntropyLoss


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_bf16_large_vocab(backend):
    if not fb.status(backend)[0]:
        pytest.skip(fb.status(backend)[1])
    x, t = make_inputs((256,), 128256, dtype=torch.bfloat16)
    x, t = x.cuda(), t.cuda()
    xa = x.clone().requires_grad_()
    with fb.use(backend):
        loss = cross_entropy(xa, t)
    loss.backward()
    t_loss, t_grad = truth(x.cpu(), t.cpu())
    p_loss, p_grad = torch_same_dtype(x, t)
    assert err(loss.cpu(), t_loss) <= 2 * err(p_loss.cpu(), t_loss) + 1e-2
    assert err(xa.grad.cpu(), t_grad) <= 2 * err(p_grad.cpu(), t_grad) + 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_extension_matches_triton(reduction):
    for name in ("triton", "cuda"):
        if not fb.status(name)[0]:
            pytest.skip(fb.status(name)[1])
    x, t = make_inputs((423,), 32001)
    x, t = x.cuda(), t.cuda()
    w = torch.rand(32001, device="cuda")
    upstream = torch.randn(423, device="cuda") if reduction == "none" else torch.tensor(1.0, device="cuda")
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-4, softcap=20.0)
    a_loss, a_grad = run("triton", x, t, upstream, **kw)
    b_loss, b_grad = run("cuda", x, t, upstream, **kw)
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_grad, b_grad, rtol=1e-4, atol=1e-7)
