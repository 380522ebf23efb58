"""The Triton selective log-softmax kernels (kernels/kl.py) split every row for 16-byte loads: a masked head up to
the first 16-byte boundary, whole aligned tiles, a masked tail (kernels._common.row_split). At an odd vocabulary
consecutive rows start at every alignment, so each launch here covers all of them: log-prob, lse, entropy and the
gradient (log-prob and entropy upstreams, temperature, ignored rows) against an fp64 truth computed here with
plain torch, at tiles small enough that a row holds several aligned tiles plus its head and tail; strided and
misaligned logits, the gradient written over the logits, and hostile values placed in the head, the aligned
body and the tail of the rows.

The launchers are called directly (the op-level suites, tests/ops/test_kl.py and test_hostile_kl.py, run them
through fastft.ops with the default tile, which under the interpreter is one tile per row)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import fastft.kernels.kl as triton_kl  # noqa: E402
from fastft.reference import kl as reference_kl  # noqa: E402

IGNORE = -100
TEMPERATURE = 0.7


def _use_tile(monkeypatch, tile):
    monkeypatch.setattr(triton_kl, "row_config", lambda v, device, **cuda_options: (tile, 4))
    monkeypatch.setattr(triton_kl, "lane_stats_config", lambda v, device: (tile, 4))


def _truth(x, index, grad_logp, grad_entropy, temperature=TEMPERATURE):
    """fp64 (logp, lse, entropy, gradient) of the rows whose index is not IGNORE (zeros elsewhere), from
    H = lse - sum_j p_j z_j (the kernel keeps log S - D / S relative to the max instead), with autograd."""
    counted = index != IGNORE
    z = (x.double() / temperature).requires_grad_()
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, index.clamp(min=0)[:, None])[:, 0] - lse
    p = torch.exp(z - lse[:, None])
    entropy = lse - (p * torch.where(p > 0, z, 0.0)).sum(-1)  # p_j = 0 (z_j = -inf) adds 0, not 0 * -inf
    zero = torch.zeros_like(lse)
    logp, lse, entropy = (torch.where(counted, t, zero) for t in (logp, lse, entropy))
    (logp * grad_logp.double() + entropy * grad_entropy.double()).sum().backward()
    return logp.detach(), lse.detach(), entropy.detach(), z.grad / temperature  # d/dx = d/dz / T


def _inputs(n, v, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    index = torch.randint(0, v, (n,), generator=g)
    index[1::4] = IGNORE
    grad_logp = torch.rand(n, generator=g) + 0.5
    grad_entropy = torch.rand(n, generator=g) - 0.5
    return x, index, grad_logp, grad_entropy


def _run(x, index, grad_logp, grad_entropy, out=None, temperature=TEMPERATURE):
    logp, lse, entropy = triton_kl.selective_log_softmax_fwd(x, index, temperature, IGNORE)
    grad = triton_kl.selective_log_softmax_bwd(grad_logp, grad_entropy, x, index, lse, entropy, temperature, IGNORE,
                                               out=out)
    return logp, lse, entropy, grad


def _torch_grad_error(x, index, grad_logp, grad_entropy, truth_grad):
    """Max error of torch's own gradient computed in x's dtype (log_softmax + gather, entropy from it)."""
    counted = index != IGNORE
    X = x.clone().requires_grad_()
    logp_all = torch.log_softmax(X / TEMPERATURE, -1)
    logp = logp_all.gather(-1, index.clamp(min=0)[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    w_logp = torch.where(counted, grad_logp, 0.0).to(x.dtype)
    w_entropy = torch.where(counted, grad_entropy, 0.0).to(x.dtype)
    (logp * w_logp + entropy * w_entropy).sum().backward()
    return (X.grad.double() - truth_grad).abs().max().item()


# V: odd (rows start at every alignment), a multiple of 8 (every row aligned), 7 (shorter than one 16-byte pack
# of bf16: all head), and a whole number of tiles plus one column.
def _check_against_truth(x, index, grad_logp, grad_entropy, outputs):
    logp, lse, entropy, grad = outputs
    t_logp, t_lse, t_entropy, t_grad = _truth(x, index, grad_logp, grad_entropy)
    # The statistics are fp32 computed from the (exact) dtype inputs: fp32 accuracy, whatever the dtype.
    for got, want in ((logp, t_logp), (lse, t_lse), (entropy, t_entropy)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert (grad[index == IGNORE] == 0).all()
    if x.dtype == torch.float32:
        torch.testing.assert_close(grad.double(), t_grad, rtol=1e-4, atol=1e-6)
    else:  # the house rule: within 2x torch's own same-dtype error + atol
        err = (grad.double() - t_grad).abs().max().item()
        assert err <= 2 * _torch_grad_error(x, index, grad_logp, grad_entropy, t_grad) + 1e-4, err


# V: odd (rows start at every alignment), a multiple of 8 (every row aligned), 7 (shorter than one 16-byte pack
# of bf16: all head), and a whole number of tiles plus one column.
@pytest.mark.parametrize("v,tile", [(7, 64), (1001, 64), (4096, 512), (1025, 256), (32001, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fp64_truth_at_every_row_alignment(monkeypatch, v, tile, dtype):
    _use_tile(monkeypatch, tile)
    n = 9  # at odd V, 8 consecutive rows start at each of the 8 (16-bit) or 4 (fp32) alignments
    x, index, grad_logp, grad_entropy = _inputs(n, v, dtype)
    _check_against_truth(x, index, grad_logp, grad_entropy, _run(x, index, grad_logp, grad_entropy))


def test_without_entropy_gradient_and_at_temperature_one(monkeypatch):
    _use_tile(monkeypatch, 64)
    x, index, grad_logp, _ = _inputs(9, 1001, torch.float32, seed=1)
    logp, lse, entropy = triton_kl.selective_log_softmax_fwd(x, index, 1.0, IGNORE)
    grad = triton_kl.selective_log_softmax_bwd(grad_logp, None, x, index, lse, entropy, 1.0, IGNORE)
    t_logp, _, _, t_grad = _truth(x, index, grad_logp, torch.zeros(9), temperature=1.0)
    torch.testing.assert_close(logp.double(), t_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["row_padded", "misaligned_base", "in_place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_misaligned_and_in_place_logits(monkeypatch, layout, dtype):
    """Rows padded to a stride that is not V (the gradient's rows then start at other alignments than the
    logits'), a base 1 element past a 16-byte boundary, and the gradient written over the logits."""
    _use_tile(monkeypatch, 64)
    n, v = 9, 1001
    x, index, grad_logp, grad_entropy = _inputs(n, v, dtype, seed=2)
    if layout == "row_padded":
        logits = torch.full((n, v + 3), float("nan"), dtype=dtype)[:, :v]
        logits.copy_(x)
    elif layout == "misaligned_base":
        logits = torch.empty(n * v + 1, dtype=dtype)[1:].view(n, v)
        logits.copy_(x)
        assert logits.data_ptr() % 16 != 0
    else:
        logits = x.clone()
    out = logits if layout == "in_place" else None
    outputs = _run(logits, index, grad_logp, grad_entropy, out=out)
    assert (outputs[3].data_ptr() == logits.data_ptr()) == (layout == "in_place")
    _check_against_truth(x, index, grad_logp, grad_entropy, outputs)


def test_agrees_with_the_reference_op(monkeypatch):
    """The kernels' (logp, entropy) equal fastft.reference.kl's at fp32 (that reference is the oracle of the
    op-level suites)."""
    _use_tile(monkeypatch, 64)
    x, index, _, _ = _inputs(9, 1001, torch.float32, seed=3)
    index[index == IGNORE] = 0
    logp, _, entropy = triton_kl.selective_log_softmax_fwd(x, index, TEMPERATURE, IGNORE)
    r_logp, r_entropy = reference_kl.selective_log_softmax(x, index, temperature=TEMPERATURE, return_entropy=True)
    torch.testing.assert_close(logp, r_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, r_entropy, rtol=1e-5, atol=1e-5)


TILE = 64
V_HOSTILE = 1001  # with TILE 64: a row of bf16 has a head of up to 7 columns, 15 whole tiles, a tail


def _where(row_start, region, vec=8):
    """A column of the row in the masked head, the aligned body, or the masked tail."""
    head = (vec - row_start % vec) % vec
    if region == "head":
        return max(head - 1, 0) if head else None
    if region == "body":
        return head + TILE + 5
    return V_HOSTILE - 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("region", ["head", "body", "tail"])
def test_hostile_values_in_half_precision(monkeypatch, dtype, region):
    """Per row r (starting at element r * V: every alignment): -inf (ordinary), +-1e4 (finite, exact against the
    fp64 truth), NaN or +inf (that row's logp / entropy NaN and a NaN gradient row, its neighbours untouched),
    placed in the row's head, aligned body or tail; ignored rows holding NaN give zeros."""
    _use_tile(monkeypatch, TILE)
    n = 9  # rows 0 and 8 start aligned (no head)
    x, index, grad_logp, grad_entropy = _inputs(n, V_HOSTILE, torch.float64, seed=4)
    index[:] = torch.arange(n) * 37 % V_HOSTILE
    index[8] = IGNORE
    poisoned = []
    for r in range(n):
        col = _where(r * V_HOSTILE, region)
        if col is None:  # an aligned row has no head
            continue
        kind = r % 4
        if kind == 0:
            x[r, col] = -math.inf
            x[r, (col + 1) % V_HOSTILE] = -math.inf
        elif kind == 1:
            x[r, col] = 1e4
        elif kind == 2:
            x[r, col] = -1e4
        else:
            x[r, col] = math.nan if r == 3 else math.inf
            poisoned.append(r)
    x[8, :] = math.nan  # ignored: never read
    x = x.to(dtype)
    logp, lse, entropy, grad = _run(x, index, grad_logp, grad_entropy)
    counted = index != IGNORE
    assert (logp[~counted] == 0).all() and (entropy[~counted] == 0).all() and (grad[~counted] == 0).all()
    bad = torch.zeros(n, dtype=torch.bool)
    bad[poisoned] = True
    bad &= counted
    assert torch.isnan(logp[bad]).all() and torch.isnan(entropy[bad]).all() and torch.isnan(grad[bad]).all()
    good = counted & ~bad
    t_logp, t_lse, t_entropy, t_grad = _truth(x[good], index[good], grad_logp[good], grad_entropy[good])
    torch.testing.assert_close(logp[good].double(), t_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse[good].double(), t_lse, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(entropy[good].double(), t_entropy, rtol=2e-5, atol=2e-5)
    assert torch.isfinite(grad[good]).all()
    eps = torch.finfo(dtype).eps
    # |gradient| <= (|g_logp| + |g_H| (1 + |log p| p)) / T; one rounding of each element to the dtype
    torch.testing.assert_close(grad[good].double(), t_grad, rtol=eps, atol=eps / TEMPERATURE)
