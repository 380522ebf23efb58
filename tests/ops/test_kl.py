"""KL family: full_kl, selective_log_softmax, kl_penalty, linear_full_kl, nn.KLPenalty.

Every backend against an fp64 truth (the reference in fp64) over odd shapes, masks, temperatures and
reductions; fp16/bf16 by the rule |op - truth| <= 2 |torch same dtype - truth| + atol; TRL's estimator
formulas written out; opcheck and torch.compile(fullgraph=True) per registered op; input errors.
Triton runs under the interpreter here (tests/conftest.py), so its shapes are small.
"""
import math
import runpy
from pathlib import Path

import pytest
import torch

import fastft
from fastft.nn.kl import KLPenalty
from fastft.ops import full_kl, kl_penalty, linear_full_kl, selective_log_softmax
from fastft.reference import kl as ref

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["cpp", "triton", "reference"]
HAS_CPP = fastft.backend.status("cpp")[0]


def _skip_unusable(backend):
    ok, why = fastft.backend.status(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")


def _shape(backend):
    # The odd shape (N=301, V=2003) on the C++ backend; fewer rows under the interpreter and
    # for the reference (its fp32 autograd graph is the slow part here).
    return (7, 43, 2003) if backend == "cpp" else (3, 7, 2003)


def _pair(shape, dtype=torch.float32, spread=0.5, scale=1.0):
    policy = torch.randn(shape, dtype=torch.float64) * scale
    ref_logits = policy + spread * torch.randn(shape, dtype=torch.float64) * scale
    return policy.to(dtype), ref_logits.to(dtype)


def _truth_full_kl(p, r, mask, temperature, reduction, grad_out, need_ref=False):
    P = p.detach().double().requires_grad_()
    R = r.detach().double().requires_grad_(need_ref)
    out = ref.full_kl(P, R, mask=mask, temperature=temperature, reduction=reduction)
    (out * grad_out).sum().backward()
    return out.detach(), P.grad, R.grad


def _run(fn, backend, *args, **kwargs):
    with fastft.backend.use(backend):
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# full_kl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature,masked", [(1.0, False), (0.7, True)])
def test_full_kl_fp32(backend, reduction, temperature, masked):
    _skip_unusable(backend)
    shape = _shape(backend)
    p, r = _pair(shape)
    mask = torch.rand(shape[:-1]) > 0.3 if masked else None
    p.requires_grad_()
    r.requires_grad_()  # gradient to the reference logits too
    out = _run(full_kl, backend, p, r, mask=mask, temperature=temperature, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == (shape[:-1] if reduction == "none" else ())
    grad_out = torch.rand(out.shape, dtype=torch.float64) + 0.5
    with fastft.backend.use(backend):
        (out * grad_out.float()).sum().backward()
    t_out, t_gp, t_gr = _truth_full_kl(p, r, mask, temperature, reduction, grad_out, need_ref=True)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=2e-6)
    gscale = t_gp.abs().max().item()
    torch.testing.assert_close(p.grad.double(), t_gp, rtol=1e-4, atol=1e-5 * gscale)
    torch.testing.assert_close(r.grad.double(), t_gr, rtol=1e-4, atol=1e-5 * gscale)
    if masked:
        assert (p.grad.reshape(-1, shape[-1])[~mask.reshape(-1)] == 0).all()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_full_kl_policy_only_grad_and_no_grad(backend):
    _skip_unusable(backend)
    p, r = _pair((5, 301))
    p.requires_grad_()
    out = _run(full_kl, backend, p, r)
    with fastft.backend.use(backend):
        out.backward()
    t_out, t_gp, _ = _truth_full_kl(p, r, None, 1.0, "mean", torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(p.grad.double(), t_gp, rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        out2 = _run(full_kl, backend, p, r, reduction="none")
    torch.testing.assert_close(out2.mean().double(), t_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_full_kl_upstream_scale_and_retain_graph(backend):
    """The fused gradient stays unscaled while the graph is retained: two backwards add up to base * (g1 + g2)."""
    _skip_unusable(backend)
    p, r = _pair((6, 257))
    p.requires_grad_()
    out = _run(full_kl, backend, p, r, reduction="sum")
    with fastft.backend.use(backend):
        (3.0 * out).backward(retain_graph=True)
    _, t_gp, _ = _truth_full_kl(p, r, None, 1.0, "sum", torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(p.grad.double(), t_gp, rtol=1e-4, atol=1e-9)
    with fastft.backend.use(backend):
        out.backward(torch.tensor(-0.5))
    _, t_gp, _ = _truth_full_kl(p, r, None, 1.0, "sum", torch.tensor(2.5, dtype=torch.float64))
    torch.testing.assert_close(p.grad.double(), t_gp, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_all_masked_is_zero(backend):
    _skip_unusable(backend)
    p, r = _pair((4, 5, 129))
    p.requires_grad_()
    out = _run(full_kl, backend, p, r, mask=torch.zeros(4, 5, dtype=torch.bool))
    with fastft.backend.use(backend):
        out.backward()
    assert out.item() == 0.0
    assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_extreme_logits_stay_finite(backend):
    """Logits of +-1e4 (and tokens the policy bans with -inf) give finite KL and gradients."""
    _skip_unusable(backend)
    p, r = _pair((6, 1003))
    p = p * 1e4 / p.abs().max()
    r = r * 1e4 / r.abs().max()
    p[:, :17] = float("-inf")  # banned by the policy: contribute 0
    p.requires_grad_()
    out = _run(full_kl, backend, p, r, reduction="none")
    with fastft.backend.use(backend):
        out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(p.grad).all()
    t_out, t_gp, _ = _truth_full_kl(p, r, None, 1.0, "none", torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-2)  # KL ~ 1e4 here: fp32 ulps
    torch.testing.assert_close(p.grad.double(), t_gp, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_kl_low_precision_rule(backend, dtype):
    _skip_unusable(backend)
    shape = (3, 11, 2003)
    p, r = _pair(shape, dtype, scale=2.0)
    mask = torch.rand(shape[:-1]) > 0.25
    p.requires_grad_()
    out = _run(full_kl, backend, p, r, mask=mask, temperature=0.9)
    assert out.dtype == dtype
    with fastft.backend.use(backend):
        out.backward()
    t_out, t_gp, _ = _truth_full_kl(p, r, mask, 0.9, "mean", torch.ones((), dtype=torch.float64))
    # torch in the same dtype: the eager formula, every op in fp16/bf16.
    P = p.detach().clone().requires_grad_()
    logp = torch.log_softmax(P / 0.9, -1)
    logr = torch.log_softmax(r / 0.9, -1)
    k = (logp.exp() * (logp - logr)).sum(-1)
    torch_out = (k * mask).sum() / mask.sum()
    torch_out.backward()
    err_out = (out.double() - t_out).abs().item()
    torch_err_out = (torch_out.double() - t_out).abs().item()
    assert err_out <= 2 * torch_err_out + 1e-3 * abs(t_out.item()) + 1e-4, (err_out, torch_err_out)
    err_g = (p.grad.double() - t_gp).abs().max().item()
    torch_err_g = (P.grad.double() - t_gp).abs().max().item()
    assert err_g <= 2 * torch_err_g + 1e-3 * t_gp.abs().max().item(), (err_g, torch_err_g)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_full_kl_cpp_float64():
    p, r = _pair((9, 333), torch.float64)
    p.requires_grad_()
    out = _run(full_kl, "cpp", p, r, temperature=1.3)
    with fastft.backend.use("cpp"):
        out.backward()
    t_out, t_gp, _ = _truth_full_kl(p, r, None, 1.3, "mean", torch.ones((), dtype=torch.float64))
    assert out.dtype == torch.float64
    # exp_u20-class vectorized exp in fp64 is ~1e-15 relative: far below fp32
    torch.testing.assert_close(out, t_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.grad, t_gp, rtol=1e-9, atol=1e-14)


def test_full_kl_mixed_dtypes_and_int_mask():
    p, r = _pair((4, 8, 100))
    mask = (torch.rand(4, 8) > 0.5).to(torch.int64)
    out = full_kl(p, r.double(), mask=mask)  # ref cast to the policy's dtype; nonzero = counted
    torch.testing.assert_close(out, ref.full_kl(p, r, mask=mask.bool()), rtol=1e-5, atol=1e-6)


# full_kl's bad inputs: its entry in tests/ops/op_db.py, run by tests/ops/test_ops_generic.py.


# ------------------------------------------------------------------------------------------------
# selective_log_softmax
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_selective_log_softmax_fp32(backend, temperature):
    _skip_unusable(backend)
    shape = _shape(backend)
    x = torch.randn(shape).requires_grad_()
    idx = torch.randint(0, shape[-1], shape[:-1])
    out = _run(selective_log_softmax, backend, x, idx, temperature=temperature)
    X = x.detach().double().requires_grad_()
    truth = torch.log_softmax(X / temperature, -1).gather(-1, idx[..., None]).squeeze(-1)
    g = torch.randn(truth.shape, dtype=torch.float64)
    with fastft.backend.use(backend):
        (out * g.float()).sum().backward()
    (truth * g).sum().backward()
    torch.testing.assert_close(out.double(), truth.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), X.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selective_log_softmax_low_precision_rule(backend, dtype):
    _skip_unusable(backend)
    x = (torch.randn(37, 2003) * 3).to(dtype).requires_grad_()
    idx = torch.randint(0, 2003, (37,))
    out = _run(selective_log_softmax, backend, x, idx)
    g = torch.randn(37, dtype=torch.float64)
    with fastft.backend.use(backend):
        (out * g.to(dtype)).sum().backward()
    X = x.detach().double().requires_grad_()
    truth = torch.log_softmax(X, -1).gather(-1, idx[:, None]).squeeze(-1)
    (truth * g).sum().backward()
    Xt = x.detach().clone().requires_grad_()
    torch_out = torch.log_softmax(Xt, -1).gather(-1, idx[:, None]).squeeze(-1)  # TRL's form, same dtype
    (torch_out * g.to(dtype)).sum().backward()
    assert out.dtype == dtype
    e, te = (out.double() - truth).abs().max(), (torch_out.double() - truth).abs().max()
    assert e <= 2 * te + 1e-3, (e, te)
    e, te = (x.grad.double() - X.grad).abs().max(), (Xt.grad.double() - X.grad).abs().max()
    assert e <= 2 * te + 1e-4, (e, te)


# ------------------------------------------------------------------------------------------------
# kl_penalty and KLPenalty
# ------------------------------------------------------------------------------------------------


def _trl(estimator, logp, ref_logp):
    # TRL's definitions, written as TRL writes them.
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    return (logp - ref_logp).abs()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kl_penalty_matches_trl(estimator, reduction):
    logp = (-torch.rand(4, 37, dtype=torch.float64) * 3).requires_grad_()
    ref_logp = (-torch.rand(4, 37, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.rand(4, 37) > 0.3
    out = kl_penalty(logp, ref_logp, estimator=estimator, mask=mask, reduction=reduction)
    per = _trl(estimator, logp, ref_logp) * mask
    want = {"none": per, "sum": per.sum(), "mean": per.sum() / mask.sum()}[reduction]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(out.sum(), (logp, ref_logp))
    g2 = torch.autograd.grad(want.sum(), (logp, ref_logp))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kl_penalty_k3_small_difference_has_no_cancellation():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float32)
    d = torch.tensor([1e-4, -3e-4], dtype=torch.float32)
    out = kl_penalty(logp, logp - d, estimator="k3")
    truth = torch.expm1(-d.double()) + d.double()  # ~ d^2/2
    torch.testing.assert_close(out.double(), truth, rtol=1e-3, atol=0)


def test_kl_penalty_bf16_keeps_dtype():
    a = torch.randn(3, 5).to(torch.bfloat16)
    b = torch.randn(3, 5).to(torch.bfloat16)
    assert kl_penalty(a, b).dtype == torch.bfloat16


def test_kl_penalty_module():
    logp, ref_logp = -torch.rand(2, 9), -torch.rand(2, 9)
    mask = torch.rand(2, 9) > 0.5
    m = KLPenalty(0.04)
    torch.testing.assert_close(m(logp, ref_logp, mask), 0.04 * kl_penalty(logp, ref_logp, mask=mask))
    m = KLPenalty(0.1, estimator="k1", reduction="mean")
    torch.testing.assert_close(m(logp, ref_logp), 0.1 * (logp - ref_logp).mean())
    assert "k1" in repr(m)
    with pytest.raises(ValueError, match="estimator"):
        KLPenalty(0.1, estimator="kl")


# ------------------------------------------------------------------------------------------------
# linear_full_kl
# ------------------------------------------------------------------------------------------------


def _linear_inputs(n_shape, h, hr, v, dtype=torch.float32):
    hp = (torch.randn(*n_shape, h, dtype=torch.float64) * 0.7).to(dtype)
    wp = (torch.randn(v, h, dtype=torch.float64) / math.sqrt(h)).to(dtype)
    href = (torch.randn(*n_shape, hr, dtype=torch.float64) * 0.7).to(dtype)
    wr = (torch.randn(v, hr, dtype=torch.float64) / math.sqrt(hr)).to(dtype)
    return hp, wp, href, wr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size,masked,ref_grad", [(None, True, False), (5, False, True)])
def test_linear_full_kl_fp32(backend, reduction, chunk_size, masked, ref_grad):
    _skip_unusable(backend)
    n_shape = (3, 11) if backend != "triton" else (2, 9)
    inputs = _linear_inputs(n_shape, 24, 16, 503)
    hp, wp, href, wr = (t.clone().requires_grad_(i < 2 or ref_grad) for i, t in enumerate(inputs))
    mask = torch.rand(n_shape) > 0.3 if masked else None
    out = _run(linear_full_kl, backend, hp, wp, href, wr, mask=mask, temperature=0.8, reduction=reduction,
               chunk_size=chunk_size)
    g = torch.rand(out.shape, dtype=torch.float64) + 0.5
    with fastft.backend.use(backend):
        (out * g.float()).sum().backward()
    T = [t.detach().double().requires_grad_(i < 2 or ref_grad) for i, t in enumerate(inputs)]
    truth = ref.linear_full_kl(*T, mask=mask, temperature=0.8, reduction=reduction)
    (truth * g).sum().backward()
    torch.testing.assert_close(out.double(), truth.detach(), rtol=1e-5, atol=1e-6)
    for mine, want in zip((hp, wp, href, wr), T):
        if want.grad is None:
            assert mine.grad is None
        else:
            torch.testing.assert_close(mine.grad.double(), want.grad, rtol=1e-4, atol=1e-6 * want.grad.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_full_kl_under_autocast(backend, reduction):
    """Under bf16 autocast the four GEMM operands are bf16 (as F.linear's), the loss fp32, the leaf
    gradients fp32; values as the reference on the bf16 operands."""
    _skip_unusable(backend)
    inputs = _linear_inputs((2, 9), 24, 16, 203)
    hp, wp = (t.clone().requires_grad_() for t in inputs[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16), fastft.backend.use(backend):
        out = linear_full_kl(hp, wp, inputs[2], inputs[3], reduction=reduction, chunk_size=5)
        out.sum().backward()
    assert out.dtype == torch.float32 and hp.grad.dtype == wp.grad.dtype == torch.float32
    T = [t.detach().bfloat16().double().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    truth = ref.linear_full_kl(*T, reduction=reduction)
    truth.sum().backward()
    torch.testing.assert_close(out.double(), truth.detach(), rtol=2e-2, atol=2e-2 * truth.abs().max().item())
    for mine, want in zip((hp, wp), T[:2]):
        torch.testing.assert_close(mine.grad.double(), want.grad, rtol=5e-2, atol=2e-2 * want.grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_full_kl_low_precision_rule(dtype):
    if not HAS_CPP:
        pytest.skip("C++ extension not built")
    inputs = _linear_inputs((40,), 32, 32, 1003, dtype)
    hp, wp = inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()
    out = _run(linear_full_kl, "cpp", hp, wp, inputs[2], inputs[3], chunk_size=8)
    with fastft.backend.use("cpp"):
        out.backward()
    T = [t.detach().double().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    truth = ref.linear_full_kl(*T)
    truth.backward()
    # torch in the same dtype: the two-logits eager version
    E = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    lp, lr = torch.log_softmax(E[0] @ E[1].t(), -1), torch.log_softmax(E[2] @ E[3].t(), -1)
    torch_out = (lp.exp() * (lp - lr)).sum(-1).mean()
    torch_out.backward()
    assert abs(out.double() - truth).item() <= 2 * abs(torch_out.double() - truth).item() + 1e-3 * truth.item()
    for mine, t_, e in ((hp, T[0], E[0]), (wp, T[1], E[1])):
        err = (mine.grad.double() - t_.grad).abs().max().item()
        terr = (e.grad.double() - t_.grad).abs().max().item()
        assert err <= 2 * terr + 1e-3 * t_.grad.abs().max().item(), (err, terr)


# ------------------------------------------------------------------------------------------------
# torch.compile of a whole GRPO-style loss (per-op opcheck / compile: tests/ops/test_ops_generic.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def loss_fn(p, r, x, idx, old, hp, wp, href, wr, mask):
        logp = selective_log_softmax(x, idx, temperature=0.9)
        k = kl_penalty(logp, old, estimator="k3", mask=mask, reduction="mean")
        return full_kl(p, r, mask=mask) + k + linear_full_kl(hp, wp, href, wr, mask=mask, chunk_size=3)

    p, r = _pair((2, 5, 97))
    x = torch.randn(2, 5, 97)
    idx = torch.randint(0, 97, (2, 5))
    old = -torch.rand(2, 5)
    hp, wp, href, wr = _linear_inputs((2, 5), 8, 6, 97)
    mask = torch.rand(2, 5) > 0.3
    leaves = [t.clone().requires_grad_() for t in (p, x, hp, wp)]
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with fastft.backend.use("cpp"):
        out = compiled(leaves[0], r, leaves[1], idx, old, leaves[2], leaves[3], href, wr, mask)
        out.backward()
    eager_leaves = [t.clone().requires_grad_() for t in (p, x, hp, wp)]
    want = loss_fn(eager_leaves[0], r, eager_leaves[1], idx, old, eager_leaves[2], eager_leaves[3], href, wr, mask)
    want.backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The documented GRPO example and the benchmark's agreement check
# ------------------------------------------------------------------------------------------------


def test_grpo_example_runs():
    result = runpy.run_path(str(ROOT / "docs" / "examples" / "grpo_step.py"), run_name="grpo_example")
    for kl in ("k3", "full"):
        losses = result["main"](steps=2, kl=kl)
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_bench_kl_providers_agree():
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import bench_kl, harness

    for op in ("full", "linear"):
        bench = bench_kl.build(bench_kl.make_config("cpu", op=op, n=48, v=301, h=16))
        diffs = harness.check_agreement(bench, names=["fastft-cpp"] if HAS_CPP else [])
        if HAS_CPP:
            assert diffs["fastft-cpp"]
