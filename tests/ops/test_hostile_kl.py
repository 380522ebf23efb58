"""Hostile values in the KL family (full_kl, selective_log_softmax, linear_full_kl, kl_penalty) on every
backend that runs here, against an fp64 truth.

The contract (fastft/reference/kl.py, kernels/kl.py): -inf logits are ordinary wherever they sit (a
leading block of a row, trailing, interleaved, all but one token), also when they fill whole kernel
blocks: the Triton kernels run with a 64-column tile here, so V = 300 spans five tiles and a leading
-inf range spans two. NaN, +inf or an all -inf row give that row NaN (never a silent finite value) and
NaN in its policy gradient row; the KL is +inf where the policy has mass on a reference -inf. Masked
rows are not read: whatever they hold gives 0 and a zero gradient.
"""
import math

import pytest
import torch

import fastft
import fastft.kernels.kl as triton_kl
from fastft.ops import full_kl, kl_penalty, linear_full_kl, selective_log_softmax
from fastft.reference import kl as ref

BACKENDS = ["reference", "cpp", "triton"]
INF = math.inf
V = 300
TILE = 64  # Triton tile under test: several tiles per row, a leading -inf range covers whole tiles


@pytest.fixture(autouse=True)
def small_triton_tiles(monkeypatch):
    monkeypatch.setattr(triton_kl, "row_config", lambda v, device, **cuda_options: (TILE, 4))
    monkeypatch.setattr(triton_kl, "lane_stats_config", lambda v, device: (TILE, 4))


def _skip_unusable(backend):
    ok, why = fastft.backend.status(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")


def _logits(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    return policy, policy + 0.5 * torch.randn(n, V, generator=g, dtype=torch.float64)


PATTERNS = ("leading", "trailing", "interleaved", "both_leading", "all_but_one", "both_one_hot")


def _banned(policy, ref_logits, pattern):
    """Rows with -inf in the places `pattern` names (policy and / or reference)."""
    p, r = policy.clone(), ref_logits.clone()
    if pattern == "leading":  # the CE bug's shape: the first tiles of the row hold nothing
        p[:, : 2 * TILE + 3] = -INF
    elif pattern == "trailing":
        p[:, V - 2 * TILE - 5:] = -INF
    elif pattern == "interleaved":
        p[:, ::3] = -INF
        p[:, TILE: 2 * TILE] = -INF
    elif pattern == "both_leading":  # both models ban the same leading range (a masked vocabulary)
        p[:, : 2 * TILE + 3] = -INF
        r[:, : 2 * TILE + 3] = -INF
    elif pattern == "all_but_one":  # the policy is one-hot on a token past the first tiles
        p.fill_(-INF)
        p[:, 3 * TILE + 1] = 1.0
    elif pattern == "both_one_hot":
        p.fill_(-INF)
        r.fill_(-INF)
        p[:, 3 * TILE + 1] = 1.0
        r[:, 3 * TILE + 1] = -2.0
        r[:, 7] = 0.5
    return p, r


def _every_pattern():
    """One row per pattern (the interpreter's cost is per call and program, so one call covers them all)."""
    p, r = _logits(len(PATTERNS))
    rows = [_banned(p[i: i + 1], r[i: i + 1], name) for i, name in enumerate(PATTERNS)]
    return torch.cat([a for a, _ in rows]), torch.cat([b for _, b in rows])


def _run_full_kl(backend, p, r, dtype, reduction, mask=None, temperature=1.0, grad_out=None):
    P = p.to(dtype).requires_grad_()
    R = r.to(dtype).requires_grad_()
    with fastft.backend.use(backend):
        out = full_kl(P, R, mask=mask, temperature=temperature, reduction=reduction)
        (out * (1.0 if grad_out is None else grad_out.to(dtype))).sum().backward()
    return out.detach(), P.grad, R.grad


def _truth_full_kl(p, r, reduction, mask=None, temperature=1.0, grad_out=None):
    return _run_full_kl("reference", p, r, torch.float64, reduction, mask, temperature, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_full_kl_minus_inf_blocks_match_fp64(backend, reduction):
    """Every -inf pattern of PATTERNS (a row each), through the unfused (none) and fused (mean) gradients."""
    _skip_unusable(backend)
    p, r = _every_pattern()
    grad_out = torch.rand(len(PATTERNS), dtype=torch.float64) + 0.5 if reduction == "none" else None
    out, gp, gr = _run_full_kl(backend, p, r, torch.float32, reduction, temperature=0.8, grad_out=grad_out)
    t_out, t_gp, t_gr = _truth_full_kl(p, r, reduction, temperature=0.8, grad_out=grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(gp).all() and torch.isfinite(gr).all()
    torch.testing.assert_close(out.double(), t_out, rtol=1e-5, atol=1e-5)
    scale = max(t_gp.abs().max().item(), t_gr.abs().max().item(), 1e-6)
    torch.testing.assert_close(gp.double(), t_gp, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(gr.double(), t_gr, rtol=1e-4, atol=1e-5 * scale)


POISONS = ("policy_nan", "ref_nan", "policy_pos_inf", "policy_all_minus_inf", "ref_all_minus_inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_nan_rows_propagate(backend):
    """Rows 1..5 each get one poison of POISONS (past the first tile, after a banned leading range): each
    alone turns NaN, and its policy gradient row is NaN everywhere (no finite-looking zeros); rows 0 and 6
    match the truth, also under "mean" (fused gradients), whose loss is NaN."""
    _skip_unusable(backend)
    p, r = _banned(*_logits(len(POISONS) + 2), "leading")
    p[1, 2 * TILE + 40] = math.nan
    r[2, 3 * TILE] = math.nan
    p[3, 4 * TILE + 2] = INF
    p[4] = -INF
    r[5] = -INF
    poisoned, keep = list(range(1, len(POISONS) + 1)), [0, len(POISONS) + 1]
    grad_out = torch.rand(len(POISONS) + 2, dtype=torch.float64) + 0.5
    out, gp, gr = _run_full_kl(backend, p, r, torch.float32, "none", grad_out=grad_out)
    assert torch.isnan(out[poisoned]).all()
    assert torch.isnan(gp[poisoned]).all()
    assert torch.isnan(gr[[2, 5]]).all()  # NaN in the reference row: its gradient row too
    t_out, t_gp, t_gr = _truth_full_kl(p[keep], r[keep], "none", grad_out=grad_out[keep])
    torch.testing.assert_close(out[keep].double(), t_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gp[keep].double(), t_gp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gr[keep].double(), t_gr, rtol=1e-4, atol=1e-6)
    out_m, gp_m, _ = _run_full_kl(backend, p, r, torch.float32, "mean")
    assert math.isnan(out_m.item())
    assert torch.isnan(gp_m[poisoned]).all() and torch.isfinite(gp_m[keep]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_is_inf_where_reference_bans_policy_mass(backend):
    """KL(pi || rho) = +inf when rho_j = 0 < pi_j: the value is +inf (not NaN); the policy gradient of that
    row has no finite entry (an infinite loss has no gradient); the reference gradient (rho - pi) / T is finite
    and matches the truth."""
    _skip_unusable(backend)
    p, r = _logits()
    r[2, TILE + 5: TILE + 9] = -INF  # the policy has mass there
    r[2, : TILE] = -INF  # and a whole banned tile before it
    grad_out = torch.rand(4, dtype=torch.float64) + 0.5
    out, gp, gr = _run_full_kl(backend, p, r, torch.float32, "none", grad_out=grad_out)
    t_out, _, t_gr = _truth_full_kl(p, r, "none", grad_out=grad_out)
    assert out[2].item() == INF and t_out[2].item() == INF
    assert not torch.isfinite(gp[2]).any()
    torch.testing.assert_close(gr.double(), t_gr, rtol=1e-4, atol=1e-6)
    keep = [0, 1, 3]
    torch.testing.assert_close(out[keep].double(), t_out[keep], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(gp[keep]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_masked_rows_holding_nan_and_inf_are_zero(backend):
    _skip_unusable(backend)
    p, r = _banned(*_logits(), "leading")
    p[1, 200] = math.nan
    r[2] = -INF
    p[3, 5] = INF
    mask = torch.tensor([True, False, False, False])
    for reduction in ("none", "mean"):
        out, gp, gr = _run_full_kl(backend, p, r, torch.float32, reduction, mask=mask)
        t_out, t_gp, t_gr = _truth_full_kl(p[:1], r[:1], reduction)
        torch.testing.assert_close(out.double()[:1] if reduction == "none" else out.double(), t_out,
                                   rtol=1e-5, atol=1e-6)
        if reduction == "none":
            assert torch.equal(out[1:], torch.zeros(3))
        assert torch.equal(gp[1:], torch.zeros(3, V)) and torch.equal(gr[1:], torch.zeros(3, V))
        torch.testing.assert_close(gp[:1].double(), t_gp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_kl_large_half_precision_logits(backend, dtype):
    """Logits of +-1e4 in fp16 / bf16, with a leading banned range: every result is finite, KL (~1e4) within
    the output dtype's rounding of the fp64 truth of the same (rounded) inputs, the gradients within two ulps
    of 1 (their scale, 1 / T)."""
    _skip_unusable(backend)
    p, r = _logits(seed=3)
    p = (p * 1e4 / p.abs().max()).to(dtype).double()
    r = (r * 1e4 / r.abs().max()).to(dtype).double()
    p[:, : 2 * TILE] = -INF
    out, gp, gr = _run_full_kl(backend, p, r, dtype, "none")
    t_out, t_gp, t_gr = _truth_full_kl(p, r, "none")
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(out).all() and torch.isfinite(gp).all() and torch.isfinite(gr).all()
    torch.testing.assert_close(out.double(), t_out, rtol=eps, atol=1e-3)
    for g, t in ((gp, t_gp), (gr, t_gr)):
        torch.testing.assert_close(g.double(), t, rtol=0, atol=2 * eps)  # |gradients| <= 1 / T = 1


# ------------------------------------------------------------------------------------------------
# selective_log_softmax
# ------------------------------------------------------------------------------------------------


def _run_selective(backend, x, index, dtype=torch.float32):
    X = x.to(dtype).requires_grad_()
    grad_out = torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float64)
    with fastft.backend.use(backend):
        out = selective_log_softmax(X, index, temperature=0.9)
        (out * grad_out.to(dtype)).sum().backward()
    return out.detach(), X.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_log_softmax_minus_inf(backend):
    """Row 0: a leading banned range; 1: interleaved; 2: all -inf but the target (logp 0, gradient 0);
    3: the target itself banned (logp -inf, finite gradient: the target's softmax is 0)."""
    _skip_unusable(backend)
    x, _ = _logits()
    x[0, : 2 * TILE + 3] = -INF
    x[1, ::4] = -INF
    x[2] = -INF
    x[2, 3 * TILE + 1] = 0.7
    x[3, 250] = -INF
    index = torch.tensor([2 * TILE + 10, 1, 3 * TILE + 1, 250])
    out, g = _run_selective(backend, x, index)
    t_out, t_g = _run_selective("reference", x, index, torch.float64)
    assert out[3].item() == -INF and t_out[3].item() == -INF
    torch.testing.assert_close(out[:3].double(), t_out[:3], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), t_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_log_softmax_nan_rows_propagate(backend):
    """NaN, +inf (a single one: no softmax), all -inf: logp NaN and a NaN gradient row; row 0 stays right."""
    _skip_unusable(backend)
    x, _ = _logits()
    x[:, : TILE] = -INF
    x[1, 3 * TILE] = math.nan
    x[2, 4 * TILE + 7] = INF
    x[3] = -INF
    index = torch.tensor([100, 5, 6, 7])
    out, g = _run_selective(backend, x, index)
    t_out, t_g = _run_selective("reference", x[:1], index[:1], torch.float64)
    assert torch.isnan(out[1:]).all() and torch.isnan(g[1:]).all()
    torch.testing.assert_close(out[:1].double(), t_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[:1].double(), t_g, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# linear_full_kl, kl_penalty
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_full_kl_nan_hidden_row(backend):
    """A NaN hidden state of the policy makes its token's KL NaN, no other's; masked, it is never read."""
    _skip_unusable(backend)
    g = torch.Generator().manual_seed(5)
    hp, hr = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    wp, wr = torch.randn(V, 16, generator=g) * 0.3, torch.randn(V, 16, generator=g) * 0.3
    hp[0, 2, 3] = math.nan  # masked
    hp[1, 4, 0] = math.nan  # counted
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2] = False
    with fastft.backend.use(backend):
        out = linear_full_kl(hp, wp, hr, wr, mask=mask, reduction="none")
    assert out[0, 2].item() == 0.0 and math.isnan(out[1, 4].item())
    clean = mask.clone()
    clean[1, 4] = False
    truth = ref.full_kl(hp[clean].double() @ wp.double().t(), hr[clean].double() @ wr.double().t(), reduction="none")
    torch.testing.assert_close(out[clean].double(), truth, rtol=1e-4, atol=1e-6)


def test_kl_penalty_hostile_log_probs():
    """k3 at d = -inf (the policy's log-prob of the sampled token is -inf) is +inf, its limit (was
    expm1(inf) - inf = NaN); d = +inf gives k3 = +inf; NaN stays NaN; masked tokens holding -inf or NaN
    give 0 and an exactly zero gradient for every estimator."""
    lp = torch.tensor([-INF, -1.0, math.nan, -0.5, -INF, -0.2], dtype=torch.float64, requires_grad=True)
    rp = torch.tensor([-1.0, -INF, -1.0, -0.7, -INF, -0.3], dtype=torch.float64, requires_grad=True)
    k3 = kl_penalty(lp, rp, estimator="k3")
    assert k3[0].item() == INF and k3[1].item() == INF
    assert math.isnan(k3[2].item()) and math.isnan(k3[4].item())
    d = (lp - rp)[3:6:2].detach()
    torch.testing.assert_close(k3[3:6:2], torch.exp(-d) + d - 1)
    k3.backward(torch.ones(6, dtype=torch.float64))
    assert lp.grad[0].item() == -INF  # d/dd (exp(-d) + d - 1) -> -inf
    torch.testing.assert_close(lp.grad[3:6:2], 1 - torch.exp(-d))
    mask = torch.tensor([False, False, False, True, False, True])
    for estimator in ("k1", "k2", "k3", "abs"):
        a = lp.detach().clone().requires_grad_()
        b = rp.detach().clone().requires_grad_()
        out = kl_penalty(a, b, estimator=estimator, mask=mask, reduction="mean")
        out.backward()
        assert torch.isfinite(out), estimator
        assert torch.equal(a.grad[~mask], torch.zeros(4, dtype=torch.float64)), estimator
        assert torch.equal(b.grad[~mask], torch.zeros(4, dtype=torch.float64)), estimator
        truth = ref.kl_penalty(lp.detach()[mask], rp.detach()[mask], estimator=estimator, reduction="mean")
        torch.testing.assert_close(out, truth)
