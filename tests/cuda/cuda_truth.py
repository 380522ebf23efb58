"""The one comparison every GPU test makes: an op's output and gradients against an fp64 truth.

Rule (the 2x-torch-error rule, docs/ARCHITECTURE.md, "Tests"): error of the op vs the fp64 truth <= 2 x (error of plain torch in the same dtype vs
that truth) + atol, with atol relative to the largest |truth|. The same rule for fp32, fp16 and bf16.

``compare(op, truth, args, kwargs, dtype, backend)`` runs
  truth(*args) in fp64                          -> the exact answer
  truth(*args) in ``dtype``                     -> torch's own error in that dtype
  op(*args) in ``dtype`` under ``backend``      -> what is tested
on copies of the same fp32 master inputs, backpropagates the same upstream gradient through each (ones for a
scalar loss, a fixed random tensor otherwise) and checks the output and every leaf's gradient.
Leaves are the floating tensors of args/kwargs with requires_grad=True; integer and bool tensors pass as they are.
"""
from __future__ import annotations

import torch

import fastft
from op_db import float_like  # tests/ops/op_db.py (on sys.path: tests/conftest.py)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("triton", "cuda")
# Rounding of the result itself, relative to the largest |truth|.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _leaves(args, kwargs) -> list:
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]


def _upstream(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient fed into backward, rounded to the tested dtype once so every run gets the same values."""
    if out.dim() == 0:
        return torch.ones((), device=out.device)
    g = torch.Generator(device=out.device).manual_seed(1234)
    return torch.randn(out.shape, generator=g, device=out.device).to(dtype).float()


def run(fn, args, kwargs, dtype, grad_dtype):
    """fn on the inputs cast to ``dtype``; returns (output, [gradient of each leaf]) in fp64."""
    args, kwargs = float_like(args, dtype), float_like(kwargs, dtype)
    out = fn(*args, **kwargs)
    leaves = _leaves(args, kwargs)
    grads = []
    if leaves:
        upstream = _upstream(out, grad_dtype).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, upstream, allow_unused=False)
    return out.detach().double(), [g.double() for g in grads]


def check(got: torch.Tensor, same_dtype: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != truth {tuple(truth.shape)}"
    assert torch.isfinite(truth).all(), f"{what}: the truth is not finite; choose other inputs"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - truth).abs().max().item()
    torch_err = (same_dtype - truth).abs().max().item()
    atol = ATOL[dtype] * truth.abs().max().item()
    assert err <= 2 * torch_err + atol, (
        f"{what}: max error {err:.3g} > 2 x torch's {dtype_id(dtype)} error {torch_err:.3g} + atol {atol:.3g}")


def compare(op, truth, args, kwargs, dtype, backend, truth_kwargs=None) -> None:
    """Check op(*args, **kwargs) under ``backend`` in ``dtype`` against truth (see the module doc).
    ``truth_kwargs`` replaces kwargs for the truth calls (e.g. a seed the op draws itself)."""
    truth_kwargs = kwargs if truth_kwargs is None else truth_kwargs
    exact, exact_grads = run(truth, args, truth_kwargs, torch.float64, dtype)
    plain, plain_grads = run(truth, args, truth_kwargs, dtype, dtype)
    with fastft.backend.use(backend):
        got, got_grads = run(op, args, kwargs, dtype, dtype)
    check(got, plain, exact, dtype, "output")
    assert len(got_grads) == len(exact_grads)
    for i, (g, p, e) in enumerate(zip(got_grads, plain_grads, exact_grads)):
        check(g, p, e, dtype, f"gradient of leaf {i}")


def compiled_matches_eager(op, args, kwargs, backend) -> None:
    """torch.compile(op, fullgraph=True) under ``backend`` gives eager's output and gradients (fp32)."""
    with fastft.backend.use(backend):
        torch._dynamo.reset()
        eager, eager_grads = run(op, args, kwargs, torch.float32, torch.float32)
        compiled_op = torch.compile(op, fullgraph=True)
        got, got_grads = run(compiled_op, args, kwargs, torch.float32, torch.float32)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    assert len(got_grads) == len(eager_grads)
    for g, e in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
