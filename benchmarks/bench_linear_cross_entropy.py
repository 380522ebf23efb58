"""Linear cross-entropy (the LM loss head): fastft vs eager linear + CE, torch.compile of it, torch's
own F.linear_cross_entropy (reference path and chunked path) and Liger's fused linear CE (CUDA).

One step = forward + backward of the mean loss (ignore_index=-100) of
``cross_entropy(x @ W^T, target)`` w.r.t. both x [N, H] and W [V, H] (leaves that require grad;
their .grad is read and reset after each step). Default shapes: CPU fp32 N=4096, H=1024, V=32000;
CUDA bf16 N=8192, H=4096, V=128256 (Llama-3 8B head). 25% of the targets ignored.
Flop count for TFLOP/s: the three GEMMs any implementation must do (logits, grad_x, grad_W),
3 * 2 * N * H * V.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness

IGNORE_INDEX = -100
DEFAULTS = {  # (N, H, V, dtype)
    ("cpu", False): (4096, 1024, 32000, "float32"),
    ("cuda", False): (8192, 4096, 128256, "bfloat16"),
    ("cpu", True): (1024, 512, 8192, "float32"),
    ("cuda", True): (2048, 2048, 32000, "bfloat16"),
}
FASTFT_BACKENDS = ("cpp", "triton", "cuda")  # fastft-<backend>


def add_arguments(p) -> None:
    g = p.add_argument_group("linear cross-entropy")
    g.add_argument("--n", type=int, help="tokens; default 4096 on CPU, 8192 on CUDA")
    g.add_argument("--h", type=int, help="hidden size; default 1024 on CPU, 4096 on CUDA")
    g.add_argument("--v", type=int, help="vocabulary; default 32000 on CPU, 128256 on CUDA")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default fp32 CPU, bf16 CUDA")
    g.add_argument("--ignore-frac", type=float, default=0.25, help="fraction of targets set to ignore_index")
    g.add_argument("--chunk-size", type=int, default=None, help="fastft token rows per chunk (default: from its budget)")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode for the torch-compile provider")
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args, device: str) -> dict:
    n, h, v, dtype = DEFAULTS[(device, bool(args.quick))]
    return {
        "device": device, "quick": bool(args.quick), "n": args.n or n, "h": args.h or h, "v": args.v or v,
        "dtype": args.dtype or dtype, "ignore_frac": args.ignore_frac, "chunk_size": args.chunk_size,
        "compile_mode": args.compile_mode, "seed": args.seed,
    }


def make_config(device: str = "cpu", **overrides) -> dict:
    """A config without argparse (tests): the defaults for ``device``, then ``overrides``."""
    n, h, v, dtype = DEFAULTS[(device, bool(overrides.get("quick", False)))]
    cfg = {"device": device, "quick": False, "n": n, "h": h, "v": v, "dtype": dtype, "ignore_frac": 0.25,
           "chunk_size": None, "compile_mode": None, "seed": 0}
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------
# Inputs and steps
# ------------------------------------------------------------------------------------------------


def _inputs(cfg: dict):
    """Same seed -> same x, W and targets for every provider (each builds its own copy). Scales as in
    a trained LM head: logits of a few units."""
    device = torch.device(cfg["device"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    n, h, v = cfg["n"], cfg["h"], cfg["v"]
    dtype = getattr(torch, cfg["dtype"])
    x = torch.randn(n, h, device=device, generator=gen).to(dtype)
    w = (torch.randn(v, h, device=device, generator=gen) * h ** -0.5).to(dtype)
    target = torch.randint(0, v, (n,), device=device, generator=gen)
    ignored = torch.rand(n, device=device, generator=gen) < cfg["ignore_frac"]
    target = target.masked_fill(ignored, IGNORE_INDEX)
    return {"x": x.requires_grad_(True), "w": w.requires_grad_(True), "target": target}


def _step_with(loss_fn):
    def step(st):
        x, w = st["x"], st["w"]
        x.grad = w.grad = None
        loss = loss_fn(x, w, st["target"])
        loss.backward()
        gx, gw = x.grad, w.grad
        x.grad = w.grad = None
        return {"loss": loss.detach(), "grad_x": gx, "grad_w": gw}

    return step


def _eager(x, w, target):
    return F.cross_entropy(F.linear(x, w), target, ignore_index=IGNORE_INDEX)


def _fastft_provider(cfg: dict, backend: str) -> harness.Provider:
    import fastft
    from fastft.ops.defs.linear_cross_entropy import linear_cross_entropy

    step = _step_with(lambda x, w, target: linear_cross_entropy(x, w, target, ignore_index=IGNORE_INDEX,
                                                                chunk_size=cfg.get("chunk_size")))
    return harness.fastft_backend_provider(cfg["device"], backend, lambda: _inputs(cfg), step,
                                           lambda: fastft.backend.status(backend))


def _compile_provider(cfg: dict) -> harness.Provider:
    return harness.torch_compile_provider(cfg, lambda: _inputs(cfg), lambda st: _eager,
                                          lambda st: _step_with(st["compiled"])(st))


def _torch_lce_provider(cfg: dict, chunked: bool) -> harness.Provider:
    name = "torch-lce-chunked" if chunked else "torch-lce"

    def available():
        if not hasattr(F, "linear_cross_entropy"):
            return False, f"torch {torch.__version__} has no F.linear_cross_entropy (added in 2.13)"
        return True, f"torch {torch.__version__}"

    def setup():
        st = _inputs(cfg)
        st["options"] = torch.nn.LinearCrossEntropyOptions() if chunked else None
        return st

    def step(st):
        def fn(x, w, target):
            return F.linear_cross_entropy(x, w, target, ignore_index=IGNORE_INDEX, options=st["options"])

        return _step_with(fn)(st)

    return harness.Provider(name, setup, step, available)


def _liger_provider(cfg: dict) -> harness.Provider:
    def setup(cls):
        st = _inputs(cfg)
        st["fn"] = cls(ignore_index=IGNORE_INDEX)
        return st

    def step(st):  # as documented: loss_fn(lin_weight, input, target)
        return _step_with(lambda x, w, t: st["fn"](w, x, t))(st)

    return harness.liger_provider(cfg["device"], "LigerFusedLinearCrossEntropyLoss", setup, step)


def build(cfg: dict) -> harness.Benchmark:
    n, h, v, dtype = cfg["n"], cfg["h"], cfg["v"], getattr(torch, cfg["dtype"])
    providers = [_fastft_provider(cfg, b) for b in FASTFT_BACKENDS]
    providers += [
        harness.Provider("torch-eager", lambda: _inputs(cfg), _step_with(_eager)),
        _compile_provider(cfg),
        _torch_lce_provider(cfg, chunked=False),
        _torch_lce_provider(cfg, chunked=True),
        _liger_provider(cfg),
    ]
    low = harness.low_precision(dtype)
    # (atol, rtol of max|eager|). fp32: GEMM summation order differs between chunked and whole
    # GEMMs, so a few ulps of the largest element. bf16: the loss comes back in bf16 (2e-2 of ln V is
    # ~4 ulps); the gradients are products of bf16-rounded logit gradients (3e-2: ~8 ulps).
    tol = ({"loss": (0.0, 2e-2), "*": (0.0, 3e-2)} if low else {"loss": (1e-6, 1e-5), "*": (0.0, 1e-4)})
    return harness.op_benchmark(
        "linear_cross_entropy", cfg, providers,
        description=f"{cfg['dtype']} N={n} H={h} V={v}, {cfg['ignore_frac']:.0%} ignored, step = forward + backward "
                    "w.r.t. x and W",
        flops_per_step=3 * 2 * n * h * v,
        tolerances=tol,
        notes=[
            "TFLOP/s counts the three GEMMs every provider must do (logits, grad_x, grad_W): 6*N*H*V.",
            "Outputs checked against torch-eager before timing: loss, grad_x and grad_W (evenly spaced rows).",
            "Peak memory is the growth over the RSS / allocated memory held between steps (x, W, targets).",
        ],
    )


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
