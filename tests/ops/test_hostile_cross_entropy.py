"""Hostile logits through cross_entropy and linear_cross_entropy on every backend that runs here.

What the right answer is (documented in fastft.ops.cross_entropy):
  * -inf logits (a masked or padded vocabulary range) are classes of probability 0. Wherever they sit in
    the row -- the whole first block of the kernel (V = 40000 > every kernel's block), the tail, every
    other column -- the loss and gradient equal the fp64 truth; nothing becomes NaN.
  * A row that is all -inf except the target: loss 0 (+ z_loss * x_y^2), gradient 0 but for the
    smoothing terms.
  * The target's own logit is -inf (others finite): loss +inf, gradient the finite p - onehot(y) (as torch).
    With label smoothing any -inf logit gives loss +inf (sum_c x_c = -inf), the gradient stays finite.
  * No finite logit at all in a counted row: loss NaN (softmax is undefined; torch gives NaN too).
  * NaN and +inf logits are never hidden: a non-finite loss and NaN in the row's gradient.
Truth: fastft.reference.cross_entropy in fp64 through autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastft import backend as fb
from fastft.ops import cross_entropy
from fastft.ops.defs.linear_cross_entropy import linear_cross_entropy
from fastft.reference.cross_entropy import cross_entropy as reference
from fastft.reference.linear_cross_entropy import linear_cross_entropy as reference_linear

BACKENDS = [b for b in ("reference", "cpp", "triton") if fb.status(b)[0]]
NEG = float("-inf")
V = 40000  # > 16384 (the interpreter's block) and > 8192 (CUDA's): the first block can be all -inf
LEAD = 20000  # leading -inf columns: more than one whole block on every backend

OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3, weighted=True),
    dict(softcap=30.0),
    dict(label_smoothing=0.05, z_loss=1e-4, softcap=20.0, weighted=True, ignore_index=7),
]
OPTION_IDS = ["plain", "smooth", "z+w", "softcap", "all"]


def hostile_rows(ignore_index=-100):
    """Eight rows of V logits with -inf placed every way a kernel's blocks can see it."""
    x = torch.randn(8, V, dtype=torch.float64) * 2
    t = torch.randint(LEAD, V, (8,))
    x[0, :LEAD] = NEG                            # leading: the whole first block(s)
    x[1, LEAD:] = NEG; t[1] = 5                   # trailing
    x[2, 1::2] = NEG; t[2] = 4                    # interleaved columns
    x[3, :5000] = NEG; x[3, 9000:30000] = NEG     # interleaved ranges, first block all -inf
    x[4] = NEG; x[4, t[4]] = 1.5                  # all -inf but the target
    x[5, :LEAD] = NEG; x[5, t[5]] = NEG           # the target's own logit is -inf: loss inf
    t[6] = ignore_index; x[6] = NEG               # ignored: never read, loss 0, gradient 0
    # row 7: plain finite logits
    return x, t


def loss_and_grad(fn, x, upstream, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, **kw)
    loss.backward(upstream)
    return loss.detach(), x.grad


def split_options(options, v):
    options = dict(options)
    weight = torch.rand(v, dtype=torch.float64) + 0.5 if options.pop("weighted", False) else None
    return options, weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_cross_entropy_minus_inf_rows_match_fp64_truth(backend, reduction, options):
    options, weight = split_options(options, V)
    x64, t = hostile_rows(options.get("ignore_index", -100))
    upstream = torch.rand(8, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    kw = dict(reduction=reduction, **options)
    t_loss, t_grad = loss_and_grad(reference, x64, upstream, target=t, weight=weight, **kw)
    with fb.use(backend):
        loss, grad = loss_and_grad(cross_entropy, x64.float(), upstream.float(), target=t,
                                   weight=None if weight is None else weight.float(), **kw)
    assert torch.isfinite(grad).all(), "a finite-target row got a NaN/inf gradient"
    assert not loss.isnan().any()
    torch.testing.assert_close(loss.double(), t_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-4, atol=1e-6)
    if reduction == "none" and "softcap" not in options:
        assert loss[5].item() == float("inf")  # the target's own logit is -inf
        assert loss[6].item() == 0.0 and torch.equal(grad[6], torch.zeros_like(grad[6]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_row_without_finite_logit_is_nan(backend):
    x = torch.full((3, V), NEG)
    x[1] = torch.randn(V)
    t = torch.tensor([3, 3, 3])
    with fb.use(backend):
        loss = cross_entropy(x, t, reduction="none")
    assert loss[0].isnan() and loss[2].isnan() and torch.isfinite(loss[1])
    assert F.cross_entropy(x, t, reduction="none")[0].isnan()  # torch agrees


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "+inf"])
@pytest.mark.parametrize("where", [0, LEAD + 3, V - 1], ids=["first", "middle", "last"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)], ids=["plain", "smooth+z"])
def test_nan_and_inf_logits_propagate(backend, bad, where, options):
    x = torch.randn(3, V)
    x[0, :LEAD] = NEG  # the bad value also behind a leading -inf range
    x[0, where] = bad
    x[2, where] = bad
    t = torch.tensor([LEAD + 1, LEAD + 1, 2])
    with fb.use(backend):
        loss, grad = loss_and_grad(cross_entropy, x, torch.ones(3), target=t, reduction="none", **options)
    for row in (0, 2):
        assert not torch.isfinite(loss[row]), f"row {row}: {bad} in the logits gave loss {loss[row].item()}"
        if bad != bad:
            assert loss[row].isnan()
        assert grad[row].isnan().any(), f"row {row}: {bad} in the logits vanished from the gradient"
    assert torch.isfinite(loss[1]) and torch.isfinite(grad[1]).all()  # other rows untouched


def error(a, truth):
    """Max |a - truth|, where equal infinities (a -inf target logit with smoothing) count as exact."""
    a = a.double()
    return torch.where(a == truth, torch.zeros_like(truth), (a - truth).abs()).max().item()


def torch_error(dtype, x, t, upstream, kw, t_loss, t_grad):
    xs = x.detach().clone().requires_grad_()
    loss = F.cross_entropy(xs, t, reduction="none", label_smoothing=kw.get("label_smoothing", 0.0))
    loss.backward(upstream.to(dtype))
    return error(loss, t_loss), error(xs.grad, t_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1)], ids=["plain", "smooth"])
def test_half_precision_1e4_logits_within_twice_torch_error(backend, dtype, options):
    n, v = 16, 20011
    x = (torch.randn(n, v) * 3).to(dtype)
    x[:, ::7] = 1e4
    x[:, 3::7] = -1e4
    x[:4, :LEAD // 2] = NEG
    t = torch.randint(LEAD // 2, v, (n,))
    t[::3] = torch.arange(LEAD // 2 + 1, v, 7)[: len(t[::3])]  # some targets on the +1e4 columns
    upstream = torch.rand(n) + 0.5
    t_loss, t_grad = loss_and_grad(reference, x.double(), upstream.double(), target=t, reduction="none", **options)
    with fb.use(backend):
        loss, grad = loss_and_grad(cross_entropy, x, upstream.to(dtype), target=t, reduction="none", **options)
    p_loss_err, p_grad_err = torch_error(dtype, x, t, upstream, options, t_loss, t_grad)
    assert torch.isfinite(grad).all()
    assert error(loss, t_loss) <= 2 * p_loss_err + 1e-6
    assert error(grad, t_grad) <= 2 * p_grad_err + 1e-6


# ------------------------------------------------------------------------------------------------
# linear_cross_entropy: -inf through the bias (a masked vocabulary), NaN through the input
# ------------------------------------------------------------------------------------------------


def linear_inputs(n=6, h=24, v=V, ignore_index=-100):
    x = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) * h ** -0.5
    b = torch.randn(v, dtype=torch.float64) * 0.5
    b[:LEAD] = NEG  # the first block(s) of every row are -inf
    b[LEAD + 100:LEAD + 9000:3] = NEG
    t = torch.randint(LEAD + 9000, v, (n,))
    t[2] = ignore_index
    return x, w, b, t


def linear_grads(fn, x, w, b, t, upstream, **kw):
    xs, ws, bs = (a.detach().clone().requires_grad_() for a in (x, w, b))
    loss = fn(xs, ws, t, linear_bias=bs, **kw)
    loss.backward(upstream)
    return loss.detach(), (xs.grad, ws.grad, bs.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_linear_cross_entropy_masked_vocabulary_matches_fp64_truth(backend, reduction, options):
    options, weight = split_options(options, V)
    x, w, b, t = linear_inputs(ignore_index=options.get("ignore_index", -100))
    upstream = torch.rand(6, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    kw = dict(reduction=reduction, **options)
    t_loss, t_grads = linear_grads(reference_linear, x, w, b, t, upstream, weight=weight, **kw)
    with fb.use(backend):
        loss, grads = linear_grads(linear_cross_entropy, x.float(), w.float(), b.float(), t, upstream.float(),
                                   weight=None if weight is None else weight.float(), chunk_size=2, **kw)
    torch.testing.assert_close(loss.double(), t_loss, rtol=2e-5, atol=2e-5)
    for g, tg in zip(grads, t_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), tg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_nan_input_propagates(backend):
    x, w, b, t = (a.float() if a.is_floating_point() else a for a in linear_inputs())
    x[1, 3] = float("nan")
    with fb.use(backend):
        loss, (gx, gw, gb) = linear_grads(linear_cross_entropy, x, w, b, t, torch.ones(6), reduction="none",
                                          chunk_size=2)
    assert loss[1].isnan() and torch.isfinite(loss[[0, 3, 4, 5]]).all()
    assert gx[1].isnan().any() and gw.isnan().any() and gb.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_cross_entropy_half_precision_1e4_logits(backend, dtype):
    """Logits of +-1e4 in half precision (and a -inf masked range): within 2x torch's own error."""
    n, h, v = 8, 16, 20011
    x = torch.randn(n, h).to(dtype)
    w = (torch.randn(v, h) * 0.3).to(dtype)
    w[::5] = (torch.sign(torch.randn(h)) * (1e4 / h)).to(dtype)  # rows whose logits reach +-1e4
    b = torch.zeros(v).to(dtype)
    b[:LEAD // 2] = NEG
    t = torch.randint(LEAD // 2, v, (n,))
    t_loss, (tgx, tgw, tgb) = linear_grads(reference_linear, x.double(), w.double(), b.double(), t,
                                            torch.ones(n, dtype=torch.float64), reduction="none")
    with fb.use(backend):
        loss, (gx, gw, gb) = linear_grads(linear_cross_entropy, x, w, b, t, torch.ones(n, dtype=dtype),
                                          reduction="none", chunk_size=3)

    def torch_run():
        xs, ws, bs = (a.detach().clone().requires_grad_() for a in (x, w, b))
        lt = F.cross_entropy(F.linear(xs, ws, bs), t, reduction="none")
        lt.backward(torch.ones(n, dtype=dtype))
        return lt.detach(), (xs.grad, ws.grad, bs.grad)

    p_loss, p_grads = torch_run()

    e = error
    assert e(loss, t_loss) <= 2 * e(p_loss, t_loss) + 1e-6
    for g, pg, tg in zip((gx, gw, gb), p_grads, (tgx, tgw, tgb)):
        assert torch.isfinite(g).all()
        assert e(g, tg) <= 2 * e(pg, tg) + 1e-6 * tg.abs().max().item() + 1e-6
