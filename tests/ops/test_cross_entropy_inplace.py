"""cross_entropy(..., inplace_backward=True): the gradient is written over the logits on every backend.

Measured, not assumed: the gradient autograd hands back shares the logits' storage, the values equal the
out-of-place gradient, and a live-bytes counter over every CPU allocation (torch.profiler's memory
events, which also see the C++ kernels' own buffers) shows no [N, V] buffer.
"""
from __future__ import annotations

import pytest
import torch
from memory_probe import peak_allocated_bytes

from fastft import backend as fb
from fastft.nn import CrossEntropyLoss
from fastft.ops import cross_entropy

BACKENDS = [b for b in ("reference", "cpp", "triton") if fb.status(b)[0]]
KERNEL_BACKENDS = [b for b in ("cpp", "triton") if fb.status(b)[0]]


def logits_and_grad(backend, h, t, inplace, upstream, **kw):
    """(logits storage pointer, d loss / d logits, the logits tensor after the call)."""
    logits = h * 1.0  # a non-leaf, as an LM head's output is (mul by a number saves nothing)
    with fb.use(backend):
        loss = cross_entropy(logits, t, inplace_backward=inplace, **kw)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    return logits.data_ptr(), grad, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0, weighted=True)],
                         ids=["plain", "all"])
def test_gradient_lands_in_the_logits_and_equals_the_out_of_place_one(backend, reduction, dtype, options):
    n, v = 23, 301
    options = dict(options)
    if options.pop("weighted", False):
        options["weight"] = torch.rand(v) + 0.5
    h = (torch.randn(n, v) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,))
    t[::5] = -100
    upstream = torch.rand(n).to(dtype) + 0.5 if reduction == "none" else torch.tensor(0.7, dtype=dtype)
    _, want, kept = logits_and_grad(backend, h, t, False, upstream, reduction=reduction, **options)
    assert torch.equal(kept, h.detach())  # out of place: the logits are untouched
    ptr, got, _ = logits_and_grad(backend, h, t, True, upstream, reduction=reduction, **options)
    assert got.data_ptr() == ptr, "the gradient is not in the logits' storage"
    if backend == "reference":  # upstream applied after the gradient (not inside autograd): rounding differs
        torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=1e-7)
    else:  # the same kernel, the same arithmetic: bit-identical
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_gradient_buffer_is_allocated(backend, reduction):
    n, v = 64, 4096
    grad_bytes = n * v * 4
    h = torch.randn(n, v, requires_grad=True)
    t = torch.randint(0, v, (n,))
    upstream = torch.ones(n) if reduction == "none" else torch.tensor(1.0)

    def step(inplace):
        logits = h * 1.0
        before = peak_allocated_bytes(lambda: None)
        assert before == 0

        def run():
            with fb.use(backend):
                loss = cross_entropy(logits, t, reduction=reduction, inplace_backward=inplace)
            torch.autograd.grad(loss, logits, upstream)

        return peak_allocated_bytes(run)

    step(True)  # warm caches (the C++ kernels' reusable buffer, Triton's compiled launcher)
    out_of_place, in_place = step(False), step(True)
    if backend == "triton":  # the C++ kernels reuse a cached gradient buffer once warm: nothing to see there
        assert out_of_place >= grad_bytes  # the counter sees the [N, V] gradient when there is one
    assert in_place < grad_bytes // 8, f"{in_place} bytes allocated for a {grad_bytes}-byte gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_leaf_or_a_view_of_a_leaf_is_refused(backend):
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.zeros(4, dtype=torch.int64)
    with fb.use(backend):
        with pytest.raises(ValueError, match="leaf tensor"):
            cross_entropy(x, t, inplace_backward=True)
        with pytest.raises(ValueError, match="view of a leaf"):
            cross_entropy(x.view(2, 2, 10), t.view(2, 2), inplace_backward=True)
        with pytest.raises(TypeError, match="inplace_backward must be a bool"):
            cross_entropy(x * 1.0, t, inplace_backward=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_saved_by_another_op_raise_instead_of_reading_gradients(backend, reduction):
    h = torch.randn(6, 50, requires_grad=True)
    t = torch.randint(0, 50, (6,))
    logits = torch.tanh(h)  # tanh saves its output for backward
    with fb.use(backend):
        loss = cross_entropy(logits, t, reduction=reduction, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_is_overwritten_without_a_gradient(backend):
    h = torch.randn(6, 50, requires_grad=True)
    t = torch.randint(0, 50, (6,))
    logits = h * 1.0
    snapshot = logits.detach().clone()
    with fb.use(backend), torch.no_grad():
        cross_entropy(logits, t, inplace_backward=True)
    assert torch.equal(logits.detach(), snapshot)


def test_module_passes_the_option():
    h = torch.randn(5, 30, requires_grad=True)
    t = torch.randint(0, 30, (5,))
    logits = h * 1.0
    loss = CrossEntropyLoss(inplace_backward=True)(logits, t)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.data_ptr() == logits.data_ptr()
    assert "inplace_backward=True" in repr(CrossEntropyLoss(inplace_backward=True))
