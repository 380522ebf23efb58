"""Hostile values through RMSNorm and SwiGLU on every backend and dtype: NaN, +inf, -inf, and +-1e4 (past fp16's
square range: RMSNorm must square in fp32). Non-finite values must propagate exactly where the pure-torch
reference puts them, forward and backward, never be hidden (a masked load's `other`, a max, a clamp), and rows or
elements away from them must stay finite and right. Shapes are odd so every Triton launch has a masked tail."""
from __future__ import annotations

import pytest
import torch

import fastft
from fastft.ops import rms_norm, swiglu
from fastft.ops.defs.rms_norm import rms_norm_op
from fastft.ops.defs.swiglu import swiglu_op
from fastft.reference import rms_norm as ref_rms_norm, swiglu as ref_swiglu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN, INF = float("nan"), float("inf")


def _use(op, backend):
    ok, why = op.backends[backend].status()
    if not ok:
        pytest.skip(f"{backend}: {why}")
    return fastft.backend.use(backend)


def _hostile_rows(n: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows; row 1 holds a NaN, row 3 +inf, row 5 -inf, row 7 +-1e4, row 9 a NaN and an inf, the last row a
    NaN in its last (tail) element; every other row is finite."""
    x = torch.randn(n, h)
    x[1, h // 3] = NAN
    x[3, 0] = INF
    x[5, h - 2] = -INF
    x[7, 2], x[7, h // 2] = 1e4, -1e4
    x[9, 4], x[9, 5] = NAN, INF
    x[n - 1, h - 1] = NAN
    return x.to(dtype)


def _assert_same_nonfinite_and_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ours, ref = ours.float(), ref.float()
    assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: NaN at {(ours.isnan() ^ ref.isnan()).nonzero()[:5]}"
    assert torch.equal(ours.isinf(), ref.isinf()), f"{what}: inf at {(ours.isinf() ^ ref.isinf()).nonzero()[:5]}"
    assert torch.equal(ours[ours.isinf()], ref[ref.isinf()]), f"{what}: inf signs differ"
    finite = ref.isfinite()
    scale = ref[finite].abs().max().clamp_min(1.0)
    err = (ours[finite] - ref[finite]).abs().max() / scale
    assert err <= 2e-2, f"{what}: relative error {err.item():.3g} on the finite elements"


def _rows_nonfinite(t: torch.Tensor) -> torch.Tensor:
    return ~t.float().isfinite().all(dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_rms_norm_propagates_nonfinite(backend, dtype):
    n, h = 13, 133
    x = _hostile_rows(n, h, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(h)).to(dtype).requires_grad_()
    grad_y = torch.randn(n, h).to(dtype)
    ref_x, ref_w = (t.detach().clone().requires_grad_() for t in (x, w))
    with _use(rms_norm_op, backend):
        y = rms_norm(x, w)
        y.backward(grad_y)
    ref_y = ref_rms_norm.rms_norm(ref_x, ref_w)
    ref_y.backward(grad_y)
    _assert_same_nonfinite_and_close(y.detach(), ref_y.detach(), "y")
    # Gradients: the formulas differ (fused vs autograd), so non-finite elements need not sit at the same
    # columns; every row the reference makes non-finite must be non-finite here too, and the rest must agree.
    hostile = _rows_nonfinite(ref_x.grad)
    assert torch.equal(_rows_nonfinite(x.grad), hostile), "dx: non-finite rows differ"
    assert hostile[[1, 3, 5, 9, n - 1]].all() and not hostile[[0, 2, 7]].any()
    _assert_same_nonfinite_and_close(x.grad[~hostile], ref_x.grad[~hostile], "dx (finite rows)")
    assert not w.grad.float().isfinite().all(), "dw hides the non-finite rows"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_swiglu_propagates_nonfinite(backend, dtype):
    n, h = 13, 101  # 1313 elements: one whole Triton block (1024 on CUDA) and a masked tail there
    gate = _hostile_rows(n, h, dtype).requires_grad_()
    up = _hostile_rows(n, h, dtype).flip(0).flip(1).contiguous().requires_grad_()
    grad_out = torch.randn(n, h).to(dtype)
    ref_gate, ref_up = (t.detach().clone().requires_grad_() for t in (gate, up))
    with _use(swiglu_op, backend):
        out = swiglu(gate, up)
        out.backward(grad_out)
    ref_out = ref_swiglu.swiglu(ref_gate, ref_up)
    ref_out.backward(grad_out)
    _assert_same_nonfinite_and_close(out.detach(), ref_out.detach(), "out")
    for ours, ref, name in ((up.grad, ref_up.grad, "d_up"), (gate.grad, ref_gate.grad, "d_gate")):
        # Element-wise: a non-finite input element makes its own gradient element non-finite or not, in both.
        assert torch.equal(ours.float().isfinite(), ref.float().isfinite()), f"{name}: non-finite elements differ"
        _assert_same_nonfinite_and_close(ours, ref, name)
