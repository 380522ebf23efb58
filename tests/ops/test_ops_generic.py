"""The generic op suite: every op in fastft.ops.registry, on every backend usable here, checked the same way, from
its entry in the op database (tests/ops/op_db.py: samples, fp64 truth, bad inputs).

Per op: parity of values and gradients with an fp64 truth over odd shapes and each dtype (fp32/fp64
tight; fp16/bf16 by the rule error <= 2 x torch's own same-dtype error + atol), torch.library.opcheck
of the registered op, torch.compile(fullgraph=True) against eager, the bad inputs the op declares, and a
second backward (retain_graph=True) that must give the same gradients again, eager and compiled.
Plus the dispatch rules of fastft.backend (a forced backend the op lacks; `use` after a compile).
Shapes are tiny: Triton runs under its CPU interpreter here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import fastft
from fastft import backend as fb
from fastft.ops import registry
from op_db import OP_DB, Sample, float_like, info
from fastft.backend import Backend, extension_kernels
from fastft.ops._define import Op, define_op

ENTRIES = registry.entries()
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Relative atol of the 2x rule (times the largest |truth|): rounding of the result itself.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cpu_backends(entry) -> list:
    return [b for b in entry.backends if b != "cuda" and entry.status()[b][0]]


def _cases(dtypes=DTYPES, backends=None):
    for entry in ENTRIES:
        for backend in cpu_backends(entry):
            if backends is not None and backend not in backends:
                continue
            for dtype in dtypes:
                if dtype in info(entry.name).dtypes:
                    yield pytest.param(entry, backend, dtype, id=f"{entry.name}-{backend}-{str(dtype)[6:]}")


def _fresh(obj):
    """Sample arguments with new leaves (so every run has its own .grad)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fresh(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    return obj


def _leaves(args, kwargs) -> list:
    flat = list(args) + list(kwargs.values())
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def _upstream(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=g, dtype=torch.float64) + 1.5


def run(fn, sample: Sample, dtype=None, backward_twice=False):
    """(output, [grads of the sample's leaves]) of fn on fresh copies of the sample (cast to dtype)."""
    args, kwargs = _fresh(sample.args), _fresh(sample.kwargs)
    if dtype is not None:
        args, kwargs = float_like(args, dtype), float_like(kwargs, dtype)
    leaves = _leaves(args, kwargs)
    out = fn(*args, **kwargs)
    if not leaves:
        return out.detach(), []
    upstream = _upstream(out.shape).to(out.dtype)
    out.backward(upstream, retain_graph=backward_twice)
    if backward_twice:
        first = [t.grad.clone() for t in leaves]
        out.backward(upstream)
        second = [t.grad - f for t, f in zip(leaves, first)]
        return out.detach(), first, second
    return out.detach(), [t.grad for t in leaves]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check_close(name, got, torch_same_dtype, truth, dtype):
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    bound = 2 * _err(torch_same_dtype, truth) + ATOL[dtype] * max(scale, 1.0)
    err = _err(got, truth)
    own = _err(torch_same_dtype, truth)
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch's own error {own:.3g})"


@pytest.mark.parametrize("entry,backend,dtype", list(_cases()))
def test_parity_with_fp64_truth(entry, backend, dtype):
    db = info(entry.name)
    for sample in db.samples(dtype, torch.device("cpu")):
        with fb.use(backend):
            out, grads = run(entry.functional, sample)
        truth, truth_grads = run(db.truth, sample, torch.float64)
        torch_out, torch_grads = run(db.truth, sample) if dtype != torch.float64 else (truth, truth_grads)
        assert out.dtype == torch_out.dtype and out.shape == truth.shape, f"{sample.name}: output dtype/shape"
        _check_close(f"{sample.name}: output", out, torch_out, truth, dtype)
        assert len(grads) == len(truth_grads)
        for i, (g, tg, ref) in enumerate(zip(grads, torch_grads, truth_grads)):
            assert g is not None and g.dtype == tg.dtype and g.shape == ref.shape, f"{sample.name}: grad {i}"
            _check_close(f"{sample.name}: grad {i}", g, tg, ref, dtype)


def _registered_calls(entry, backend, sample, monkeypatch) -> list:
    """The (op, flat args) of every call the functional makes into a defined op."""
    calls, original = [], Op.__call__

    def spy(self, *inputs, options=None, backend):
        calls.append((self, self.registered_args(*inputs, options=options, backend=backend)))
        return original(self, *inputs, options=options, backend=backend)

    monkeypatch.setattr(Op, "__call__", spy)
    with fb.use(backend):
        run(entry.functional, sample)
    monkeypatch.setattr(Op, "__call__", original)
    return calls


@pytest.mark.parametrize("entry,backend,dtype", list(_cases((torch.float32,), ("cpp", "triton"))))
def test_opcheck(entry, backend, dtype, monkeypatch):
    for sample in info(entry.name).samples(dtype, torch.device("cpu"))[:2]:
        calls = _registered_calls(entry, backend, sample, monkeypatch)
        assert calls, f"{entry.name} on {backend} did not call its defined op"
        for op, args in calls:
            args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                         for a in args)
            torch.library.opcheck(op.registered, args)


@pytest.mark.parametrize("entry,backend,dtype", list(_cases((torch.float32,), ("cpp",))))
def test_compile_fullgraph_matches_eager_and_second_backward(entry, backend, dtype):
    torch._dynamo.reset()
    compiled = torch.compile(entry.functional, fullgraph=True)
    for sample in info(entry.name).samples(dtype, torch.device("cpu"))[:2]:
        # AOTAutograd donates saved buffers unless told not to, and then refuses any retain_graph=True.
        with fb.use(backend), torch._functorch.config.patch(donated_buffer=False):
            out_e, first_e, second_e = run(entry.functional, sample, backward_twice=True)
            out_c, first_c, second_c = run(compiled, sample, backward_twice=True)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        for ge, gc, se, sc in zip(first_e, first_c, second_e, second_c):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
            # The second backward gives the same gradients again, in both modes.
            torch.testing.assert_close(se, ge, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sc, ge, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry,backend,dtype", list(_cases((torch.float32,), ("triton", "reference"))))
def test_second_backward_repeats_gradients(entry, backend, dtype):
    for sample in info(entry.name).samples(dtype, torch.device("cpu"))[:2]:
        with fb.use(backend):
            _, first, second = run(entry.functional, sample, backward_twice=True)
        for f, s in zip(first, second):
            torch.testing.assert_close(s, f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_bad_inputs_raise_clearly(entry):
    cases = info(entry.name).bad_inputs(torch.device("cpu"))
    assert cases, f"{entry.name} declares no bad inputs"
    for case in cases:
        with pytest.raises(case.error, match=case.match):
            entry.functional(*case.args, **case.kwargs)


def test_registry_lists_every_public_op_and_the_op_db_covers_it():
    names = {e.name for e in ENTRIES}
    assert set(fastft.ops.__all__) - {"checks", "defs", "registry"} <= names
    assert set(OP_DB) == names, "tests/ops/op_db.py must describe exactly the registered ops"
    for entry in ENTRIES:
        assert getattr(fastft.ops, entry.name) is entry.functional


# ------------------------------------------------------------------------------------------------
# Dispatch rules of fastft.backend and fastft.ops._define
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ToyOptions:
    alpha: float = 1.0


def _toy_forward(x: torch.Tensor, options: _ToyOptions, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return x * options.alpha + (0.0 if backend == "cpp" else 1.0), x.new_empty((0,))


_toy = define_op(
    "generic_suite_toy", forward=_toy_forward,
    fake=lambda x, options, backend: (torch.empty_like(x), x.new_empty((0,))),
    setup=lambda ctx, inputs, outputs: None, backward=lambda ctx, grad: (grad * ctx.options.alpha,),
    options=_ToyOptions, reference=lambda x, alpha: x * alpha + 1.0, backends=(Backend("reference"), Backend("cpp")),
)


def test_forced_backend_the_op_lacks_falls_back_for_that_op_only():
    x = torch.ones(3)
    with fb.use("triton"), pytest.warns(RuntimeWarning, match="generic_suite_toy has no 'triton' backend"):
        assert _toy.select(x) == "cpp"


def test_options_flatten_into_the_schema():
    schema = str(_toy.registered._opoverload._schema)
    assert "float alpha" in schema and "str backend" in schema
    assert [f.name for f in dataclasses.fields(_ToyOptions)] == ["alpha"]


def test_use_after_compile_recompiles_with_the_new_backend():
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(x):
        return _toy(x, options=_ToyOptions(2.0), backend=_toy.select(x))[0]

    compiled = torch.compile(fn, backend=record, fullgraph=True)
    x = torch.ones(3)
    with fb.use("cpp"):
        torch.testing.assert_close(compiled(x), torch.full((3,), 2.0))
    with fb.use("reference"):
        torch.testing.assert_close(compiled(x), torch.full((3,), 3.0))  # not the cpp graph kept from before
    assert len(graphs) == 2


def test_info_and_benchmarks_read_the_registry(capsys):
    from benchmarks import run_ops
    from fastft.__main__ import info

    assert info() == 0
    printed = capsys.readouterr().out
    for entry in ENTRIES:
        assert f"\n  {entry.name}\n" in printed
        if entry.benchmark is not None:
            assert entry.benchmark in run_ops.BENCHES


def test_forced_cuda_selects_the_cuda_extension_for_every_op_that_has_it(monkeypatch):
    """What FASTFT_BACKEND=cuda does on a CUDA machine, simulated here: the probes say CUDA is usable and
    fastft._C has CUDA kernels. Ops declaring a cuda backend take it; ops without one fall back to their
    default (triton) with a warning, instead of failing."""
    monkeypatch.setitem(fb._status_cache, "cuda", (True, "simulated"))
    monkeypatch.setitem(fb._status_cache, "triton", (True, "simulated"))
    monkeypatch.setattr(fb, "_has_kernel", lambda kernel, key: True)
    monkeypatch.setattr(fb, "_warned", set())
    monkeypatch.setattr(fb, "_choices", {})
    for entry in ENTRIES:
        if entry.op is None:
            continue
        if "cuda" in entry.op.backends:
            assert fb.select_backend(entry.name, "cuda", "cuda") == "cuda"
        else:
            with pytest.warns(RuntimeWarning, match=f"{entry.name} has no 'cuda' backend"):
                assert fb.select_backend(entry.name, "cuda", "cuda") == "triton"
        for backend in entry.op.backends.values():  # what the simulation bound must not outlive it
            backend._kernels = None


def test_cuda_backends_call_kernels_the_cpu_extension_declares():
    """The cuda backend of an op binds its kernels with the same binder as cpp (the same torch.ops.fastft
    schemas, csrc/schemas.cpp; csrc/cuda registers its kernels under them), so each must exist in the extension
    built here: binding the cpp set checks every name."""
    if not fb.status("cpp")[0]:
        pytest.skip(fb.status("cpp")[1])
    for entry in ENTRIES:
        if entry.op is None or "cuda" not in entry.op.backends:
            continue
        cpp, cuda = entry.op.backends["cpp"], entry.op.backends["cuda"]
        assert cuda.bind is not None and cuda.bind is cpp.bind, f"{entry.name}: cuda must bind what cpp binds"
        assert cpp.status() == (True, fb.status("cpp")[1]), f"{entry.name}: {cpp.status()[1]}"
        assert vars(cpp.kernels), f"{entry.name}: a compiled backend must bind the extension kernels it calls"


def test_a_missing_extension_kernel_makes_the_backend_unusable_with_its_name():
    if not fb.status("cpp")[0]:
        pytest.skip(fb.status("cpp")[1])
    backend = Backend("cpp", extension_kernels(fwd="no_such_kernel"))
    assert backend.status() == (False, "fastft._C has no CPU kernel for fastft::no_such_kernel")


def test_forced_backend_the_op_has_but_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(fb, "_choices", {})
    monkeypatch.setitem(fb._status_cache, "triton", (False, "simulated: no triton"))
    with fb.use("triton"), pytest.raises(RuntimeError, match="requested for cross_entropy but is unusable"):
        fastft.ops.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with fb.use("cuda"), pytest.raises(ValueError, match="runs on CUDA tensors"):
        fastft.ops.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))
