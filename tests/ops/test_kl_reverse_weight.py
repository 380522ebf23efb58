"""full_kl / linear_full_kl with ``reverse_weight`` w: per token (1 - w) KL(p || r) + w KL(r || p) from one pass.

Every backend that runs here (reference, cpp, triton under the interpreter) against an fp64 truth written out in
this file (log_softmax of both rows, both directions summed with the p = 0 / r = 0 terms left out), for
w in {0, 0.3, 1}: an odd shape (N = 7 tokens, V = 1000), masked tokens, temperature != 1, the three reductions,
gradients to both sides; bf16 by the 2x-torch rule; hostile rows (+-1e4, -inf in one row or both, NaN).
"""
import math

import pytest
import torch

import fastft
from fastft.ops import full_kl, linear_full_kl

BACKENDS = ["reference", "cpp", "triton"]
WEIGHTS = [0.0, 0.3, 1.0]
N, V = 7, 1000
INF = math.inf


def _skip_unusable(backend):
    ok, why = fastft.backend.status(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")


def _kl_rows(logp, logr):
    """sum_v p_v (log p_v - log r_v); a p_v = 0 token adds 0 (the where sits inside, so the gradient stays 0)."""
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logr, torch.zeros_like(logp))).sum(-1)


def truth_rows(policy, ref, temperature, w):
    """(1 - w) KL(p || r) + w KL(r || p) per row in fp64, a weight-0 direction left out."""
    logp = torch.log_softmax(policy.double() / temperature, -1)
    logr = torch.log_softmax(ref.double() / temperature, -1)
    rows = 0
    if w < 1:
        rows = (1 - w) * _kl_rows(logp, logr)
    if w > 0:
        rows = rows + w * _kl_rows(logr, logp)
    return rows


def truth(policy, ref, mask, temperature, reduction, w, grad_out):
    """(loss, d/dpolicy, d/dref) in fp64 for upstream gradient grad_out."""
    P = policy.detach().double().requires_grad_()
    R = ref.detach().double().requires_grad_()
    if mask is None:
        rows = truth_rows(P, R, temperature, w)
    else:  # masked tokens are not read: whatever they hold gives 0 and a zero gradient
        keep = mask[:, None]
        rows = truth_rows(torch.where(keep, P, 0.0), torch.where(keep, R, 0.0), temperature, w)
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "sum":
        out = rows.sum()
    elif reduction == "mean":
        out = rows.sum() / (rows.numel() if mask is None else mask.sum())
    else:
        out = rows
    (out * grad_out).sum().backward()
    return out.detach(), P.grad, R.grad


def run(backend, policy, ref, dtype, **kwargs):
    P = policy.detach().to(dtype).requires_grad_()
    R = ref.detach().to(dtype).requires_grad_()
    with fastft.backend.use(backend):
        out = full_kl(P, R, **kwargs)
        grad_out = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        (out * grad_out.to(dtype)).sum().backward()
    return out.detach(), P.grad, R.grad, grad_out


def _pair(seed=0, spread=0.7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    return policy, policy + spread * scale * torch.randn(N, V, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# full_kl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_full_kl_reverse_weight_fp32(backend, w, reduction):
    _skip_unusable(backend)
    p, r = _pair()
    mask = torch.ones(N, dtype=torch.bool)
    mask[[1, 4]] = False
    p[1, :5] = float("nan")  # a masked token is not read: its NaN must not reach anything
    out, gp, gr, grad_out = run(backend, p, r, torch.float32, mask=mask, temperature=0.7, reduction=reduction,
                                reverse_weight=w)
    t_out, t_gp, t_gr = truth(p, r, mask, 0.7, reduction, w, grad_out)
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=2e-6)
    scale = max(t_gp.abs().max().item(), t_gr.abs().max().item())
    torch.testing.assert_close(gp.double(), t_gp, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(gr.double(), t_gr, rtol=1e-4, atol=1e-5 * scale)
    assert (gp[~mask] == 0).all() and (gr[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_full_kl_reverse_weight_kernels_return_both_directions(backend):
    """The kernel gives KL(p || r) and KL(r || p) per row when w > 0, and no reverse row at all when w == 0 (the
    one-direction kernel runs: nothing computed for the other direction)."""
    _skip_unusable(backend)
    from fastft.ops.defs.full_kl import full_kl_op

    p, r = (t.float() for t in _pair(seed=1))
    kernels = full_kl_op.kernels(backend)
    kl0, lse_p0, lse_r0, kl_rev0, *_ = kernels.kl_fwd(p, r, None, None, 0.9, False, False, 0.0)
    assert kl_rev0.numel() == 0
    kl, lse_p, lse_r, kl_rev, *_ = kernels.kl_fwd(p, r, None, None, 0.9, False, False, 0.3)
    torch.testing.assert_close(kl.double(), truth_rows(p, r, 0.9, 0.0), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(kl_rev.double(), truth_rows(p, r, 0.9, 1.0), rtol=1e-5, atol=2e-6)
    for a, b in ((kl0, kl), (lse_p0, lse_p), (lse_r0, lse_r)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w", [0.3, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_full_kl_reverse_weight_bf16_rule(backend, w, reduction):
    """|op - truth| <= 2 |torch bf16 - truth| + atol, loss and both gradients; truth in fp64 on the same bf16
    inputs."""
    _skip_unusable(backend)
    p, r = (t.bfloat16().double() for t in _pair(seed=2, spread=0.4))
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.3
    out, gp, gr, grad_out = run(backend, p, r, torch.bfloat16, mask=mask, temperature=0.8, reduction=reduction,
                                reverse_weight=w)
    t_out, t_gp, t_gr = truth(p, r, mask, 0.8, reduction, w, grad_out)
    # torch in bf16: the same formula, every op in bf16
    P, R = p.bfloat16().requires_grad_(), r.bfloat16().requires_grad_()
    logp, logr = torch.log_softmax(P / 0.8, -1), torch.log_softmax(R / 0.8, -1)
    rows = (1 - w) * (logp.exp() * (logp - logr)).sum(-1) + w * (logr.exp() * (logr - logp)).sum(-1)
    rows = rows * mask
    e_out = rows if reduction == "none" else rows.sum() / mask.sum()
    (e_out * grad_out.bfloat16()).sum().backward()
    for mine, eager, want in ((out, e_out.detach(), t_out), (gp, P.grad, t_gp), (gr, R.grad, t_gr)):
        err = (mine.double() - want).abs().max().item()
        torch_err = (eager.double() - want).abs().max().item()
        assert err <= 2 * torch_err + 1e-2 * want.abs().max().item(), (err, torch_err)


# ------------------------------------------------------------------------------------------------
# hostile rows
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w", WEIGHTS)
def test_full_kl_reverse_weight_large_logits(backend, w):
    """Logits of +-1e4 (both rows near the same large value) and a range both models ban (-inf at the same
    tokens): finite, and equal to the fp64 truth of the same fp32 inputs within fp32 rounding of 1e4."""
    _skip_unusable(backend)
    p, r = _pair(seed=4, spread=0.3, scale=1.0)
    p, r = p.float().double(), r.float().double()
    p[:4] += 1e4
    r[:4] += 1e4
    p[4:] -= 1e4
    r[4:] -= 1e4
    p, r = p.float().double(), r.float().double()
    p[:, 100:160] = -INF
    r[:, 100:160] = -INF
    out, gp, gr, grad_out = run(backend, p, r, torch.float32, reduction="none", reverse_weight=w)
    t_out, t_gp, t_gr = truth(p, r, None, 1.0, "none", w, grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(gp).all() and torch.isfinite(gr).all()
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-2)  # fp32 ulps of lse ~ 1e4
    torch.testing.assert_close(gp.double(), t_gp, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gr.double(), t_gr, rtol=1e-4, atol=1e-3)
    assert (gp[:, 100:160] == 0).all() and (gr[:, 100:160] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_full_kl_reverse_weight_minus_inf_in_one_row(backend, reduction):
    """Row 0: the policy bans tokens the reference keeps -> KL(r || p) = +inf; row 1: the reference bans tokens the
    policy keeps -> KL(p || r) = +inf. With w = 0.3 both rows' loss is +inf and the direction that is infinite has
    no gradient on its "policy" side (no finite entry; NaN in the kernels) while the other side stays the fp64 truth; with w = 1 row 1's +inf
    direction has weight 0 and must leave no trace (finite loss and gradients, = truth)."""
    _skip_unusable(backend)
    p, r = _pair(seed=5)
    p[0, 10:20] = -INF
    r[1, 30:40] = -INF
    for w in (0.3, 1.0):
        out, gp, gr, grad_out = run(backend, p, r, torch.float32, reduction="none", reverse_weight=w)
        t_out, t_gp, t_gr = truth(p, r, None, 1.0, "none", w, grad_out)
        ok = slice(2, N)  # the untouched rows
        torch.testing.assert_close(out[ok].double(), t_out[ok], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(gp[ok].double(), t_gp[ok], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gr[ok].double(), t_gr[ok], rtol=1e-4, atol=1e-5)
        assert out[0] == INF
        assert not torch.isfinite(gr[0]).any()  # KL(r || p) infinite: no gradient on r's side of it
        torch.testing.assert_close(gp[0].double(), t_gp[0], rtol=1e-4, atol=1e-5)  # (pi - rho) / T: finite
        if w == 0.3:
            assert out[1] == INF and not torch.isfinite(gp[1]).any()
            torch.testing.assert_close(gr[1].double(), t_gr[1], rtol=1e-4, atol=1e-5)
        else:
            assert torch.isfinite(out[1]) and torch.isfinite(gp[1]).all() and torch.isfinite(gr[1]).all()
            torch.testing.assert_close(out[1].double(), t_out[1], rtol=1e-5, atol=2e-6)
            torch.testing.assert_close(gp[1].double(), t_gp[1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gr[1].double(), t_gr[1], rtol=1e-4, atol=1e-5)
    if reduction == "mean":  # the fused gradient: an infinite loss, never a silently finite one
        out, *_ = run(backend, p, r, torch.float32, reduction="mean", reverse_weight=0.3)
        assert out == INF


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w", [0.3, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_full_kl_reverse_weight_nan_propagates(backend, w, reduction):
    """A NaN in either row makes that row's loss NaN and both of its gradient rows NaN; other rows are intact."""
    _skip_unusable(backend)
    p, r = _pair(seed=6)
    p[2, 500] = float("nan")
    r[5, 3] = float("nan")
    out, gp, gr, grad_out = run(backend, p, r, torch.float32, reduction=reduction, reverse_weight=w)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[2, 5]] = True
    assert torch.isnan(out).all() if reduction == "mean" else torch.isnan(out[bad]).all()
    if reduction == "none":
        t_out, t_gp, t_gr = truth(p, r, None, 1.0, "none", w, grad_out)
        torch.testing.assert_close(out[~bad].double(), t_out[~bad], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(gp[~bad].double(), t_gp[~bad], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gr[~bad].double(), t_gr[~bad], rtol=1e-4, atol=1e-5)
    assert torch.isnan(gp[bad]).all() and torch.isnan(gr[bad]).all()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_reverse_weight_out_of_range_raises(bad):
    p = torch.randn(3, 11)
    hp, wp = torch.randn(3, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match="reverse_weight"):
        full_kl(p, p, reverse_weight=bad)
    with pytest.raises(ValueError, match="reverse_weight"):
        linear_full_kl(hp, wp, hp, wp, reverse_weight=bad)
    with pytest.raises(TypeError, match="reverse_weight"):
        full_kl(p, p, reverse_weight=torch.tensor(0.3))


# ------------------------------------------------------------------------------------------------
# linear_full_kl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w", [0.3, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_full_kl_reverse_weight_fp32(backend, w, reduction):
    """Chunked (3 chunks), masked, temperature 0.8, gradients to all four inputs, against the fp64 truth of the
    whole logits."""
    _skip_unusable(backend)
    g = torch.Generator().manual_seed(7)
    n, h, h_ref, v = 11, 24, 16, 1000
    inputs = (torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g,
              dtype=torch.float64) / h ** 0.5 * 2, torch.randn(n, h_ref, generator=g, dtype=torch.float64),
              torch.randn(v, h_ref, generator=g, dtype=torch.float64) / h_ref ** 0.5 * 2)
    mask = torch.rand(n, generator=g) > 0.3
    leaves = [t.float().requires_grad_() for t in inputs]
    with fastft.backend.use(backend):
        out = linear_full_kl(*leaves, mask=mask, temperature=0.8, reduction=reduction, chunk_size=4,
                             reverse_weight=w)
        grad_out = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        (out * grad_out.float()).sum().backward()
    T = [t.clone().requires_grad_() for t in inputs]
    rows = torch.where(mask, truth_rows(T[0] @ T[1].T, T[2] @ T[3].T, 0.8, w), torch.zeros(n, dtype=torch.float64))
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / mask.sum()}[reduction]
    (want * grad_out).sum().backward()
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=2e-6)
    for mine, t in zip(leaves, T):
        torch.testing.assert_close(mine.grad.double(), t.grad, rtol=1e-4, atol=1e-5 * t.grad.abs().max().item())
