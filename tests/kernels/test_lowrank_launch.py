"""What the Triton launchers of LoRA and the adapter hand their kernels, checked without running them: the kernels
are replaced by recorders and the inputs live on the meta device (no data, any device-placement mistake shows):
the dropout seed reaches the kernel on the input's device (a host seed would reach a CUDA kernel as a host
pointer), and fp32 dots use TF32 exactly when torch's matmul setting allows it."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastft.kernels import adapter as adapter_kernels, dropout as kernel_dropout, lora as lora_kernels  # noqa: E402


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@pytest.fixture
def lora_recorders(monkeypatch):
    names = ("_lora_down_kernel", "_lora_matmul_kernel", "_lora_down_grad_kernel", "_dropout_mask_kernel")
    recorders = {name: Recorder() for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(lora_kernels, name, recorder)
    return recorders


def _lora_inputs(dtype, n=8, d_in=24, d_out=40, r=4):
    meta = torch.device("meta")
    return (torch.empty(n, d_in, device=meta, dtype=dtype), torch.empty(d_out, d_in, device=meta, dtype=dtype),
            torch.empty(r, d_in, device=meta, dtype=dtype), torch.empty(d_out, r, device=meta, dtype=dtype))


def _pointer_args(call):
    args, _ = call
    return [a for a in args if isinstance(a, torch.Tensor)]


def test_lora_seed_reaches_kernels_on_input_device(lora_recorders):
    x, w, a, b = _lora_inputs(torch.bfloat16)
    host_seed = torch.tensor([1234], dtype=torch.int64)
    y, u = lora_kernels.lora_linear_fwd(x, w, None, a, b, 2.0, 0.25, host_seed)
    lora_kernels.lora_linear_bwd(torch.empty_like(y), x, w, a, b, u, host_seed, 2.0, 0.25, True, False, False,
                                 True, True)
    lora_kernels.lora_dropout_mask(x, 0.25, host_seed)
    launched = [name for name, rec in lora_recorders.items() if rec.calls]
    assert set(launched) == set(lora_recorders), f"kernels never launched: {set(lora_recorders) - set(launched)}"
    for name, recorder in lora_recorders.items():
        for call in recorder.calls:
            devices = {t.device.type for t in _pointer_args(call)}
            assert devices == {"meta"}, f"{name} got tensors on {devices}"


def test_adapter_seed_reaches_kernel_on_input_device(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(adapter_kernels, "_adapter_act_dropout_kernel", recorder)
    pre = torch.empty(16, 8, device="meta", dtype=torch.float16)
    host_seed = torch.tensor([99], dtype=torch.int64)
    threshold = kernel_dropout.drop_threshold(0.1)
    adapter_kernels.adapter_act_dropout_fwd(pre, host_seed, 1, threshold, True)
    adapter_kernels.adapter_act_dropout_bwd(torch.empty_like(pre), pre, host_seed, 1, threshold, 1.0, True, True)
    assert len(recorder.calls) == 2
    for call in recorder.calls:
        assert {t.device.type for t in _pointer_args(call)} == {"meta"}


def test_seed_on_moves_only_when_needed():
    seed = torch.tensor([7], dtype=torch.int64)
    assert kernel_dropout.seed_on(seed, torch.empty(3)).data_ptr() == seed.data_ptr()  # already there: no copy
    moved = kernel_dropout.seed_on(torch.tensor(7, dtype=torch.int32), torch.empty(3, device="meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.int64 and moved.shape == (1,)


@pytest.fixture
def tf32_setting():
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_dots_follow_torch_tf32_setting(lora_recorders, tf32_setting, allow_tf32, dtype):
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    x, w, a, b = _lora_inputs(dtype)
    seed = torch.tensor([5], dtype=torch.int64, device="meta")
    y, u = lora_kernels.lora_linear_fwd(x, w, None, a, b, 1.0, 0.1, seed)
    lora_kernels.lora_linear_bwd(torch.empty_like(y), x, w, a, b, u, seed, 1.0, 0.1, True, False, False, True, False)
    expected = "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"
    dot_kernels = ("_lora_down_kernel", "_lora_matmul_kernel", "_lora_down_grad_kernel")
    seen = [kwargs["DOT_PRECISION"] for name in dot_kernels for _, kwargs in lora_recorders[name].calls]
    assert len(seen) == 5 and set(seen) == {expected}, seen


def test_lora_gpu_default_follows_the_byte_flop_plan(monkeypatch):
    from fastft import backend
    from fastft.ops.defs import lora as lora_ops

    plans = lora_ops.lora_forward_plan(*lora_ops.BENCHMARK_SHAPE)
    tokens, _, d_out, _ = lora_ops.BENCHMARK_SHAPE
    extra = sum(k.bytes for k in plans["cuda"]) - sum(k.bytes for k in plans["triton"])
    assert extra == 2 * tokens * d_out * 2  # the beta = 1 GEMM reads y, and y is written twice
    assert sum(k.flops for k in plans["cuda"]) == sum(k.flops for k in plans["triton"])
    best, why = lora_ops.planned_cuda_default()
    assert backend.preferred("lora_linear", "cuda")[0] == best
    assert "predicted" in why and "not measured" in why
    # The choice is computed: a Triton GEMM as fast as cuBLAS would make the leaner-traffic Triton path win.
    monkeypatch.setattr(lora_ops, "TRITON_GEMM_RATE", lora_ops.CUBLAS_GEMM_RATE)
    assert lora_ops.planned_cuda_default()[0] == "triton"


def test_fastft_info_says_why_lora_defaults_to_its_gpu_path(capsys):
    from fastft.__main__ import info

    info()
    lines = [line for line in capsys.readouterr().out.splitlines() if "default on cuda" in line]
    assert any("byte/flop plan" in line for line in lines), lines
