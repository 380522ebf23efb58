"""fastft.ops.linear_selective_log_softmax (log-probs + entropy of a linear head, chunked) and the entropy output of
the selective log-softmax kernels it runs, on every CPU-usable backend against an fp64 truth.

Values AND gradients (hidden, weight, bias) with random upstream gradients on both outputs (logp and entropy);
fp32 tight, bf16 by the rule error <= 2 x torch's own bf16 error + atol. Odd shapes (several lanes' tiles with a
partial last one, N = 1), ignored targets, temperature != 1, -inf bias entries (a masked vocabulary), +-1e4
hidden states in bf16, NaN rows, torch.compile(fullgraph=True), the top-1 flags, the kernels' ignore_index and
in-place gradient (out = the logits). The logit soft cap (Gemma-2/3: log_softmax(c * tanh(z / c) / T)) through the
same checks: values, entropy and gradients through the cap, saturated (+-1e4 logits) and infinite logits, NaN.
The generic suite (test_ops_generic.py, op_db.py) adds opcheck, bad inputs and a second backward.
"""
import pytest
import torch
import torch.nn.functional as F

import fastft
from fastft.ops import linear_selective_log_softmax, selective_log_softmax
from fastft.ops.defs.linear_selective_log_softmax import linear_log_softmax_stats
from op_db import log_softmax_entropy_truth, soft_capped
# the KL family's hostile-value suite: its Triton tile (TILE = 64 columns, an autouse fixture) and backend skip
from test_hostile_kl import BACKENDS, INF, TILE, _skip_unusable, small_triton_tiles  # noqa: F401

V, H = 203, 24  # four Triton tiles of 64 per row, the last one partial
ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _case(n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    bias[:TILE + 5] = -INF  # a masked vocabulary: the whole first tile and more
    bias[150::7] = -INF
    target = torch.randint(TILE + 5, V, (n,), generator=g)
    target[(target >= 150) & ((target - 150) % 7 == 0)] = 100  # targets at finite logits
    grads = (torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
    return hidden, weight, bias, target, grads


def _truth(hidden, weight, bias, target, temperature, ignore_index, softcap=None):
    """(logp, entropy) in the inputs' dtype: plain torch on the whole logits (capped first, then / T)."""
    logp, entropy = log_softmax_entropy_truth(soft_capped(F.linear(hidden, weight, bias), softcap), temperature)
    counted = target != ignore_index
    picked = logp.gather(-1, torch.where(counted, target, 0)[:, None])[:, 0]
    zero = torch.zeros((), dtype=logp.dtype)
    return torch.where(counted, picked, zero), torch.where(counted, entropy, zero)


def _run(fn, case, dtype, **kwargs):
    """(logp, entropy, grad hidden, grad weight, grad bias) of fn on the case cast to dtype."""
    hidden, weight, bias, target, (g_logp, g_ent) = case
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = fn(*leaves, target, **kwargs)
    ((logp * g_logp.to(logp.dtype)).sum() + (entropy * g_ent.to(entropy.dtype)).sum()).backward()
    return [logp.detach(), entropy.detach(), *(t.grad for t in leaves)]


def _fastft(backend, **options):
    def fn(hidden, weight, bias, target):
        with fastft.backend.use(backend):
            return linear_selective_log_softmax(hidden, weight, target, bias=bias, return_entropy=True, **options)
    return fn


def _torch(temperature=1.0, ignore_index=-100, softcap=None, **_):
    return lambda hidden, weight, bias, target: _truth(hidden, weight, bias, target, temperature, ignore_index,
                                                       softcap)


def _err(a, b):
    both_inf = (a.double() == b) & torch.isinf(b)
    return (a.double() - b).abs().masked_fill(both_inf, 0).max().item()


def _check(got, truth, torch_same_dtype, dtype, what):
    names = ("logp", "entropy", "grad hidden", "grad weight", "grad bias")
    for name, g, t, own in zip(names, got, truth, torch_same_dtype):
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        bound = 2 * _err(own, t) + ATOL[dtype] * max(t.abs().max().item(), 1.0)
        assert _err(g, t) <= bound, f"{what}: {name} error {_err(g, t):.3g} > {bound:.3g} (torch {_err(own, t):.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,temperature,chunk_size,softcap", [(13, 0.7, 4, None), (1, 1.0, None, None),
                                                              (13, 0.7, 4, 1.5), (1, 1.0, None, 30.0)])
def test_values_and_gradients_match_fp64(backend, dtype, n, temperature, chunk_size, softcap):
    """softcap 1.5: logits of a few units, the cap bends them hard (tanh' well below 1); 30: Gemma-2's value."""
    _skip_unusable(backend)
    case = _case(n, scale=1.0 if softcap is None else 3.0)
    if n > 1:
        case[3][::4] = -100  # ignored rows
    options = dict(temperature=temperature, chunk_size=chunk_size, softcap=softcap)
    truth = _run(_torch(**options), case, torch.float64)
    own = _run(_torch(**options), case, dtype)
    got = _run(_fastft(backend, **options), case, dtype)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == (n,)
    _check(got, truth, own, dtype, f"{backend} {dtype}")
    if n > 1:  # ignored rows: exactly 0, and no gradient reaches their hidden states
        assert (got[0][::4] == 0).all() and (got[1][::4] == 0).all() and (got[2][::4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_large_bf16_hidden_states(backend, softcap):
    """+-1e4 hidden states in bf16: logits of ~1e4, nearly one-hot softmax; entropy and gradients stay finite
    and within the 2x rule (the entropy is taken relative to the row max, so it does not cancel against it).
    With a cap of 30 the logits saturate at +-30 (tanh' ~ 0 there: the gradient flows only through the
    few logits left inside the cap)."""
    _skip_unusable(backend)
    case = _case(9, seed=3, scale=1e4)
    truth = _run(_torch(softcap=softcap), case, torch.float64)
    own = _run(_torch(softcap=softcap), case, torch.bfloat16)
    got = _run(_fastft(backend, chunk_size=4, softcap=softcap), case, torch.bfloat16)
    _check(got, truth, own, torch.bfloat16, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_saturated_and_infinite_logits(backend, dtype):
    """Half precision, cap 5: logits of ~+-3e3 (hidden states scaled by 3e3) and +-inf bias entries all
    saturate the cap (+-inf caps to +-5: finite, as in torch; a capped -inf bias no longer masks its token).
    Values and gradients stay finite and within the 2x rule."""
    _skip_unusable(backend)
    case = _case(9, seed=12, scale=3e3)
    case[2][[100, 120]] = INF
    truth = _run(_torch(softcap=5.0), case, torch.float64)
    own = _run(_torch(softcap=5.0), case, dtype)
    got = _run(_fastft(backend, chunk_size=4, softcap=5.0), case, dtype)
    _check(got, truth, own, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_entropy_only_gradient(backend, softcap):
    """A loss of the entropy alone (GRPO's entropy bonus) trains the head, through the cap too: same gradients
    as torch's."""
    _skip_unusable(backend)
    hidden, weight, bias, target, _ = _case(7, seed=4, scale=2.0)
    case = (hidden, weight, bias, target, (torch.zeros(7, dtype=torch.float64), torch.ones(7, dtype=torch.float64)))
    truth = _run(_torch(softcap=softcap), case, torch.float64)
    got = _run(_fastft(backend, softcap=softcap), case, torch.float32)
    for g, t in zip(got[2:], truth[2:]):
        assert t.abs().max() > 1e-3
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_nan_hidden_row_poisons_only_its_token(backend, softcap):
    _skip_unusable(backend)
    hidden, weight, bias, target, _ = _case(5, seed=5)
    hidden[2, 3] = float("nan")
    with fastft.backend.use(backend):
        logp, entropy = linear_selective_log_softmax(hidden.float(), weight.float(), target, bias=bias.float(),
                                                     softcap=softcap, return_entropy=True)
    t_logp, t_ent = _truth(hidden, weight, bias, target, 1.0, -100, softcap)
    assert torch.isnan(logp[2]) and torch.isnan(entropy[2])
    keep = torch.arange(5) != 2
    torch.testing.assert_close(logp[keep].double(), t_logp[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[keep].double(), t_ent[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_flags(backend):
    _skip_unusable(backend)
    hidden, weight, bias, _, _ = _case(12, seed=6)
    x, w, b = hidden.float(), weight.float(), bias.float()
    target = F.linear(x, w, b).argmax(-1)
    target[::2] = 100  # mostly not the argmax
    target[1] = -100
    with fastft.backend.use(backend):
        logp, entropy, is_top1 = linear_log_softmax_stats(x, w, target, bias=b, chunk_size=5)
    expected = (F.linear(x, w, b).argmax(-1) == target) & (target != -100)
    assert is_top1.dtype == torch.bool and torch.equal(is_top1, expected) and expected[3]
    assert not logp.requires_grad and entropy.shape == (12,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_flags_of_the_capped_logits(backend):
    """A cap of 0.05 saturates the larger logits to one value: the top-1 is the first of the tied capped maxima
    (TRL caps before its argmax too), not the uncapped argmax."""
    _skip_unusable(backend)
    hidden, weight, bias, _, _ = _case(12, seed=6, scale=3.0)
    x, w, b = hidden.float(), weight.float(), bias.float()
    capped = soft_capped(F.linear(x, w, b), 0.05)
    at_max = capped == capped.max(-1, keepdim=True).values
    assert (at_max.sum(-1) > 1).all()  # every row ties
    first = at_max.int().argmax(-1)
    last = V - 1 - at_max.int().flip(-1).argmax(-1)
    target = torch.where(torch.arange(12) % 2 == 0, first, last)
    target[1] = -100
    with fastft.backend.use(backend):
        is_top1 = linear_log_softmax_stats(x, w, target, bias=b, chunk_size=5, softcap=0.05)[2]
    assert is_top1.tolist() == [i % 2 == 0 for i in range(12)]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_compiled_fullgraph_matches_eager(backend, softcap):
    _skip_unusable(backend)
    case = _case(6, seed=7)
    fn = _fastft(backend, temperature=0.8, chunk_size=4, softcap=softcap)
    eager = _run(fn, case, torch.float32)
    torch._dynamo.reset()
    compiled = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), case, torch.float32)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# The selective log-softmax kernels' entropy, ignore_index and in-place gradient; its functional's return_entropy
# ------------------------------------------------------------------------------------------------


def _kernels(backend):
    from fastft.ops.defs.selective_log_softmax import selective_log_softmax_op
    return selective_log_softmax_op.kernels(backend)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_ignore_rows_and_write_over_the_logits(backend, dtype):
    _skip_unusable(backend)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, V, generator=g, dtype=torch.float64) * 2
    x[1, :100] = -INF
    x[3] = float("nan")  # ignored: never read
    index = torch.tensor([7, 150, 202, -7, 0])
    g_logp, g_ent = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    k = _kernels(backend)
    logits = x.to(dtype)
    logp, lse, entropy = k.fwd(logits, index, 0.9, -7)
    buf = logits.clone()
    grad = k.bwd(g_logp.float(), g_ent.float(), buf, index, lse, entropy, 0.9, -7, out=buf)
    assert grad.data_ptr() == buf.data_ptr()
    assert logp[3] == 0 and entropy[3] == 0 and (grad[3] == 0).all()
    keep = torch.tensor([0, 1, 2, 4])
    z = x[keep].to(dtype).double().requires_grad_()
    t_all, t_ent = log_softmax_entropy_truth(z, 0.9)
    t_logp = t_all.gather(1, index[keep, None])[:, 0]
    ((t_logp * g_logp[keep]).sum() + (t_ent * g_ent[keep]).sum()).backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(logp[keep].double(), t_logp.detach(), **tol)
    torch.testing.assert_close(entropy[keep].double(), t_ent.detach(), **tol)
    torch.testing.assert_close(grad[keep].double(), z.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_selective_log_softmax_return_entropy(backend, softcap, monkeypatch):
    """With a cap, backward walks the rows in chunks (a 4 KiB budget: 5 rows of 203 fp32 logits, 3 chunks)."""
    _skip_unusable(backend)
    monkeypatch.setenv("FASTFT_LCE_CHUNK_BYTES", "4096")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, V, generator=g, dtype=torch.float64) * (1.0 if softcap is None else 4.0)
    x[..., :TILE] = -INF
    index = torch.randint(TILE, V, (3, 4), generator=g)
    up = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)

    def run(dt, use):
        X = x.to(dt).requires_grad_()
        with fastft.backend.use(use):
            logp, entropy = selective_log_softmax(X, index, temperature=0.8, softcap=softcap, return_entropy=True)
        ((logp * up[0].to(dt)).sum() + (entropy * up[1].to(dt)).sum()).backward()
        return logp.detach(), entropy.detach(), X.grad

    got, truth = run(torch.float32, backend), run(torch.float64, "reference")
    assert got[0].dtype == got[1].dtype == torch.float32
    for a, b in zip(got, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selective_log_softmax_softcap_hostile_logits(backend, dtype):
    """Half-precision logits holding +-1e4, +-inf and, in one row, NaN under a cap of 5: every other row is
    finite (the cap maps +-inf and +-1e4 to +-5, as torch's c * tanh(x / c)) with finite gradients, within 2x
    torch's own error in that dtype against the fp64 truth; the NaN row's log-prob, entropy and gradient are
    NaN, as torch's."""
    _skip_unusable(backend)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, V, generator=g, dtype=torch.float64) * 3
    x[0, 10], x[0, 11], x[1, 12], x[1, 13] = 1e4, -1e4, INF, -INF
    x[2, :TILE] = -INF
    x[3, 50] = float("nan")
    index = torch.tensor([10, 13, 100, 4, 11, 200])
    up = torch.randn(2, 6, generator=g, dtype=torch.float64)

    def run(dt, fn):
        X = x.detach().to(dt).requires_grad_()
        logp, entropy = fn(X)
        ((logp * up[0].to(dt)).sum() + (entropy * up[1].to(dt)).sum()).backward()
        return logp.detach(), entropy.detach(), X.grad

    def torch_way(X):
        logp, entropy = log_softmax_entropy_truth(soft_capped(X, 5.0), 0.9)
        return logp.gather(-1, index[:, None])[:, 0], entropy

    def fastft_way(X):
        with fastft.backend.use(backend):
            return selective_log_softmax(X, index, temperature=0.9, softcap=5.0, return_entropy=True)

    truth, own, got = run(torch.float64, torch_way), run(dtype, torch_way), run(dtype, fastft_way)
    ok = torch.arange(6) != 3
    for name, g_, t, o in zip(("logp", "entropy", "grad"), got, truth, own):
        assert torch.isnan(g_[3]).all() and torch.isnan(t[3]).all(), name
        assert torch.isfinite(g_[ok]).all(), name
        bound = 2 * _err(o[ok], t[ok]) + ATOL[dtype] * max(t[ok].abs().max().item(), 1.0)
        assert _err(g_[ok], t[ok]) <= bound, f"{name}: {_err(g_[ok], t[ok]):.3g} > {bound:.3g}"
