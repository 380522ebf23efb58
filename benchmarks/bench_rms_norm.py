"""RMSNorm forward + backward: fastft vs Hugging Face's LlamaRMSNorm (eager and torch.compile), torch's
F.rms_norm and Liger-Kernel's LigerRMSNorm.

One step = forward and backward of the norm on a [N, H] input that requires grad and a weight that requires
grad, with a fixed random upstream gradient; the step returns y, dx and dw (and resets the .grad fields).
Default shapes: CPU fp32 N=4096, H=2048 (the issue's target); CUDA bf16 N=16384, H=4096. The weight is
1 + 0.1 * randn. Every provider computes Llama's casting (the normalised x rounded to x's dtype before the
weight; a no-op in fp32), except F.rms_norm, which rounds once: in bf16 it differs by that rounding.
"""
from __future__ import annotations

import sys

import torch

from benchmarks import harness

DEFAULTS = {  # (N, H, dtype)
    ("cpu", False): (4096, 2048, "float32"),
    ("cuda", False): (16384, 4096, "bfloat16"),
    ("cpu", True): (512, 1024, "float32"),
    ("cuda", True): (4096, 2048, "bfloat16"),
}
FASTFT_BACKENDS = ("cpp", "triton", "cuda")
EPS = 1e-6


def add_arguments(p) -> None:
    g = p.add_argument_group("rms_norm")
    g.add_argument("--n", type=int, help="rows (tokens); default 4096 CPU, 16384 CUDA")
    g.add_argument("--hidden", type=int, help="hidden size; default 2048 CPU, 4096 CUDA")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--compile-mode", default=None)
    g.add_argument("--seed", type=int, default=0)


def make_config(device: str = "cpu", **overrides) -> dict:
    n, h, dtype = DEFAULTS[(device, bool(overrides.get("quick", False)))]
    cfg = {"device": device, "quick": False, "n": n, "hidden": h, "dtype": dtype, "compile_mode": None, "seed": 0}
    cfg.update(overrides)
    return cfg


def config_from_args(args, device: str) -> dict:
    cfg = make_config(device, quick=bool(args.quick))
    for key in ("n", "hidden", "dtype"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(compile_mode=args.compile_mode, seed=args.seed)
    return cfg


def _inputs(cfg: dict, module_cls=None) -> dict:
    """x, the upstream gradient and a norm module (transformers' LlamaRMSNorm unless ``module_cls``) whose weight
    is the same for every provider."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    x = torch.randn(cfg["n"], cfg["hidden"], device=device, generator=gen).to(dtype).requires_grad_(True)
    grad = torch.randn(cfg["n"], cfg["hidden"], device=device, generator=gen).to(dtype)
    weight = 1 + 0.1 * torch.randn(cfg["hidden"], device=device, generator=gen)
    norm = (module_cls or LlamaRMSNorm)(cfg["hidden"], eps=EPS).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return {"x": x, "grad": grad, "norm": norm}


def _step(fn):
    """A step running ``fn(state) -> y`` forward and backward."""

    def step(st):
        x, norm = st["x"], st["norm"]
        y = fn(st)
        y.backward(st["grad"])
        out = {"y": y.detach(), "dx": x.grad, "dw": norm.weight.grad}
        x.grad = None
        norm.weight.grad = None
        return out

    return step


def _module_forward(st):
    return st["norm"](st["x"])


def _fastft_provider(cfg: dict, backend: str) -> harness.Provider:
    from fastft.ops.defs.rms_norm import rms_norm, rms_norm_op

    step = _step(lambda st: rms_norm(st["x"], st["norm"].weight, st["norm"].variance_epsilon))
    return harness.fastft_backend_provider(cfg["device"], backend, lambda: _inputs(cfg), step,
                                           rms_norm_op.backends[backend].status)


def _compile_provider(cfg: dict) -> harness.Provider:
    return harness.torch_compile_provider(cfg, lambda: _inputs(cfg), lambda st: st["norm"],
                                          _step(lambda st: st["compiled"](st["x"])))


def _liger_provider(cfg: dict) -> harness.Provider:
    # LigerRMSNorm as Liger documents it for Llama: casting_mode "llama", offset 0.
    return harness.liger_provider(cfg["device"], "LigerRMSNorm", lambda cls: _inputs(cfg, cls),
                                  _step(_module_forward), note="casting_mode=llama")


def build(cfg: dict) -> harness.Benchmark:
    n, h = cfg["n"], cfg["hidden"]
    dtype = getattr(torch, cfg["dtype"])
    providers = [_fastft_provider(cfg, b) for b in FASTFT_BACKENDS]
    providers += [
        harness.Provider("torch-eager", lambda: _inputs(cfg), _step(_module_forward)),
        _compile_provider(cfg),
        harness.Provider("torch-F.rms_norm", lambda: _inputs(cfg),
                         _step(lambda st: torch.nn.functional.rms_norm(st["x"], (h,), st["norm"].weight, EPS))),
        _liger_provider(cfg),
    ]
    low = harness.low_precision(dtype)
    elem = dtype.itemsize
    return harness.op_benchmark(
        "rms_norm", cfg, providers,
        description=f"{cfg['dtype']} N={n} H={h}, step = forward + backward (dx and dw)",
        # forward reads x and writes y; backward reads dy and x and writes dx: the floor for any implementation
        bytes_per_step=5 * n * h * elem,
        # dw sums N rows in the provider's own order and dtype: a bf16 eager sum is itself coarse
        tolerances={"*": (0.0, 3e-2)} if low else {"*": (1e-5, 1e-4)},
        notes=[
            "torch-eager is transformers' LlamaRMSNorm; torch-compile is the same module under "
            "torch.compile(fullgraph=True), warmed up (its compile time is the 1st call).",
            "GB/s counts x read twice, y written, dy read and dx written once (5*N*H*element size); the weight "
            "and the per-row statistics are small.",
        ],
    )


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
