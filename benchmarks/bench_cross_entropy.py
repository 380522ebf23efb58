"""Cross-entropy over [N, V] logits: fastft vs torch eager, torch.compile and Liger-Kernel.

One step = forward + backward of the mean loss (ignore_index=-100) w.r.t. the logits, a leaf that
requires grad (its .grad is read and reset after each step). Default shapes: CPU fp32 N=4096,
V=32000; CUDA bf16 N=8192, V=128256 (Llama-3 vocabulary); 25% of the targets ignored. Byte count
for GB/s: the logits read once + their gradient written once (the floor for any implementation).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness

IGNORE_INDEX = -100
DEFAULTS = {  # (N, V, dtype)
    ("cpu", False): (4096, 32000, "float32"),
    ("cuda", False): (8192, 128256, "bfloat16"),
    ("cpu", True): (1024, 8192, "float32"),
    ("cuda", True): (2048, 32000, "bfloat16"),
}
FASTFT_BACKENDS = ("cpp", "triton", "cuda")  # fastft-<backend>; "reference" only with --include-reference


def add_arguments(p) -> None:
    g = p.add_argument_group("cross-entropy")
    g.add_argument("--n", type=int, help="rows (tokens); default 4096 on CPU, 8192 on CUDA (1024 / 2048 with --quick)")
    g.add_argument("--v", type=int, help="classes (vocabulary); default 32000 on CPU, 128256 on CUDA")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="logits dtype; default fp32 CPU, bf16 CUDA")
    g.add_argument("--ignore-frac", type=float, default=0.25, help="fraction of targets set to ignore_index")
    g.add_argument("--include-reference", action="store_true", help="add fastft's pure-torch reference as a provider")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode for the torch-compile provider")
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args, device: str) -> dict:
    n, v, dtype = DEFAULTS[(device, bool(args.quick))]
    return {
        "device": device,
        "quick": bool(args.quick),
        "n": args.n or n,
        "v": args.v or v,
        "dtype": args.dtype or dtype,
        "ignore_frac": args.ignore_frac,
        "include_reference": bool(args.include_reference),
        "compile_mode": args.compile_mode,
        "seed": args.seed,
    }


def make_config(device: str = "cpu", **overrides) -> dict:
    """A config without argparse (tests): the defaults for ``device``, then ``overrides``."""
    n, v, dtype = DEFAULTS[(device, bool(overrides.get("quick", False)))]
    cfg = {"device": device, "quick": False, "n": n, "v": v, "dtype": dtype, "ignore_frac": 0.25,
           "include_reference": False, "compile_mode": None, "seed": 0}
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------
# Inputs and steps
# ------------------------------------------------------------------------------------------------


def _inputs(cfg: dict):
    """Same seed -> same logits and targets for every provider (each builds its own copy)."""
    device = torch.device(cfg["device"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    n, v = cfg["n"], cfg["v"]
    logits = torch.randn(n, v, device=device, generator=gen).to(getattr(torch, cfg["dtype"]))
    target = torch.randint(0, v, (n,), device=device, generator=gen)
    ignored = torch.rand(n, device=device, generator=gen) < cfg["ignore_frac"]
    target = target.masked_fill(ignored, IGNORE_INDEX)
    return {"logits": logits.requires_grad_(True), "target": target}


def _step_with(loss_fn):
    def step(st):
        logits = st["logits"]
        logits.grad = None
        loss = loss_fn(logits, st["target"])
        loss.backward()
        grad, logits.grad = logits.grad, None
        return {"loss": loss.detach(), "grad": grad}

    return step


def _eager_ce(logits, target):
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def _fastft_provider(cfg: dict, backend: str) -> harness.Provider:
    import fastft

    step = _step_with(lambda logits, target: fastft.cross_entropy(logits, target, ignore_index=IGNORE_INDEX))
    return harness.fastft_backend_provider(cfg["device"], backend, lambda: _inputs(cfg), step,
                                           lambda: fastft.backend.status(backend))


def _compile_provider(cfg: dict) -> harness.Provider:
    # the same function as eager
    return harness.torch_compile_provider(cfg, lambda: _inputs(cfg), lambda st: _eager_ce,
                                          lambda st: _step_with(st["compiled"])(st))


def _liger_provider(cfg: dict) -> harness.Provider:
    def setup(cls):
        st = _inputs(cfg)
        st["fn"] = cls(ignore_index=IGNORE_INDEX)
        return st

    def step(st):
        # As documented and as Liger's own benchmark runs it. Liger writes the gradient into the
        # logits' storage in forward, so later steps run on those values: same work, same speed.
        return _step_with(st["fn"])(st)

    return harness.liger_provider(cfg["device"], "LigerCrossEntropyLoss", setup, step)


def build(cfg: dict) -> harness.Benchmark:
    n, v, dtype = cfg["n"], cfg["v"], getattr(torch, cfg["dtype"])
    providers = [_fastft_provider(cfg, b) for b in FASTFT_BACKENDS]
    if cfg["include_reference"]:
        providers.append(_fastft_provider(cfg, "reference"))  # a stand-in, not a peer
    providers += [
        harness.Provider("torch-eager", lambda: _inputs(cfg), _step_with(_eager_ce)),
        _compile_provider(cfg),
        _liger_provider(cfg),
    ]
    low = harness.low_precision(dtype)
    # (atol, rtol of max|eager|). fp32: a correct kernel differs from eager by rounding only. bf16/fp16:
    # the loss comes back in the logits' dtype (1 ulp of bf16 near ln(128256) = 11.8 is 0.06: 2e-2 is
    # ~4 ulps) and each gradient element is rounded (3e-2 of the largest is ~8 ulps of it). No atol on
    # the gradient: its elements are ~1/N, an atol would let a zero gradient pass.
    tol = {"loss": (0.0, 2e-2), "grad": (0.0, 3e-2)} if low else {"loss": (1e-6, 1e-5), "grad": (0.0, 1e-4)}
    elem = dtype.itemsize
    return harness.op_benchmark(
        "cross_entropy", cfg, providers,
        description=f"{cfg['dtype']} N={n} V={v}, {cfg['ignore_frac']:.0%} ignored, step = forward + backward",
        bytes_per_step=2 * n * v * elem,
        tolerances=tol,
        notes=[
            "GB/s counts the logits read once + the gradient written once (2*N*V*element size).",
            "Outputs checked against torch-eager before timing: the loss, and the gradient on evenly spaced rows.",
        ],
    )


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
