"""Bottleneck adapter x + up(dropout(act(down(x)))): fastft vs the eager block and torch.compile of it.

One step = forward + backward of the block on a [N, H] input that requires grad, with an upstream
gradient of ones-like random values; the step returns y, dx and (without dropout) the up-projection's weight gradient
(and resets every .grad). Default shapes: CPU fp32 N=4096 tokens, H=1024, bottleneck 64, relu,
dropout 0.1 (the issue's target); CUDA bf16 N=16384, H=4096. Parameters are nn.Linear's default init.

Output check: the providers draw different dropout masks (torch's Bernoulli vs fastft's counter-based
hash), so the outputs compared with the eager block (y, dx and the up-projection's weight gradient) come
from the same step with dropout off (Provider.check_step), and must match it to rounding; the timed steps
use the configured dropout. Mask-for-mask agreement with dropout is asserted in tests/ops/test_adapter.py.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness

DEFAULTS = {  # (N, H, r, dtype)
    ("cpu", False): (4096, 1024, 64, "float32"),
    ("cuda", False): (16384, 4096, 64, "bfloat16"),
    ("cpu", True): (1024, 512, 64, "float32"),
    ("cuda", True): (4096, 2048, 64, "bfloat16"),
}
FASTFT_BACKENDS = ("cpp", "triton", "cuda")


def add_arguments(p) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--n", type=int, help="tokens; default 4096 CPU, 16384 CUDA")
    g.add_argument("--hidden", type=int, help="hidden size; default 1024 CPU, 4096 CUDA")
    g.add_argument("--r", type=int, help="bottleneck size; default 64")
    g.add_argument("--activation", default="relu", choices=("relu", "gelu", "gelu_tanh", "silu"))
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--scale", type=float, default=1.0)
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--compile-mode", default=None)
    g.add_argument("--seed", type=int, default=0)


def make_config(device: str = "cpu", **overrides) -> dict:
    n, h, r, dtype = DEFAULTS[(device, bool(overrides.get("quick", False)))]
    cfg = {"device": device, "quick": False, "n": n, "hidden": h, "r": r, "dtype": dtype, "activation": "relu",
           "dropout": 0.1, "scale": 1.0, "compile_mode": None, "seed": 0}
    cfg.update(overrides)
    return cfg


def config_from_args(args, device: str) -> dict:
    cfg = make_config(device, quick=bool(args.quick))
    for key in ("n", "hidden", "r", "dtype"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(activation=args.activation, dropout=args.dropout, scale=args.scale, compile_mode=args.compile_mode,
               seed=args.seed)
    return cfg


def _inputs(cfg: dict) -> dict:
    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(cfg["seed"])
    down = torch.nn.Linear(cfg["hidden"], cfg["r"]).to(device, dtype)
    up = torch.nn.Linear(cfg["r"], cfg["hidden"]).to(device, dtype)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1)
    x = torch.randn(cfg["n"], cfg["hidden"], device=device, generator=gen).to(dtype).requires_grad_(True)
    grad = torch.randn(cfg["n"], cfg["hidden"], device=device, generator=gen).to(dtype)
    return {"x": x, "grad": grad, "down": down, "up": up}


def _eager_block(cfg: dict):
    """What a user writes: nn.Linear, activation, nn.functional.dropout, residual (scale only when != 1)."""
    act = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
           "silu": F.silu}[cfg["activation"]]
    p, scale = cfg["dropout"], cfg["scale"]

    def block(x, down, up):
        h = F.dropout(act(down(x)), p=p, training=True) if p > 0 else act(down(x))
        out = up(h)
        return x + out if scale == 1.0 else x + scale * out

    return block


def _without_dropout(cfg: dict) -> dict:
    return {**cfg, "dropout": 0.0}


def _step_with(fn, cfg):
    def step(st):
        x, down, up = st["x"], st["down"], st["up"]
        y = fn(x, down, up)
        y.backward(st["grad"])
        out = {"y": y.detach(), "dx": x.grad, "d_up_weight": up.weight.grad}
        x.grad = None
        for m in (down, up):
            m.weight.grad = None
            m.bias.grad = None
        return out

    return step


def _fastft_provider(cfg: dict, backend: str) -> harness.Provider:
    import fastft.backend
    from fastft.ops.defs.adapter import adapter

    def adapter_step(config):
        def fn(x, down, up):
            return adapter(x, down.weight, down.bias, up.weight, up.bias, activation=config["activation"],
                           dropout_p=config["dropout"], scale=config["scale"])

        return _step_with(fn, config)

    return harness.fastft_backend_provider(cfg["device"], backend, lambda: _inputs(cfg), adapter_step(cfg),
                                           lambda: fastft.backend.status(backend),
                                           check_step=adapter_step(_without_dropout(cfg)))


def _compile_provider(cfg: dict) -> harness.Provider:
    def compiled(config):
        return torch.compile(_eager_block(config), fullgraph=True, dynamic=False, mode=cfg.get("compile_mode"))

    def setup():
        st = _inputs(cfg)
        st["fn"] = compiled(cfg)
        return st

    def check_step(st):  # compiled on first use: the timed steps never see this graph's compile
        st.setdefault("check_fn", compiled(_without_dropout(cfg)))
        return _step_with(st["check_fn"], _without_dropout(cfg))(st)

    return harness.Provider("torch-compile", setup, lambda st: _step_with(st["fn"], cfg)(st), check_step=check_step)


def build(cfg: dict) -> harness.Benchmark:
    n, h, r = cfg["n"], cfg["hidden"], cfg["r"]
    dtype = getattr(torch, cfg["dtype"])
    providers = [_fastft_provider(cfg, b) for b in FASTFT_BACKENDS]
    providers += [harness.Provider("torch-eager", lambda: _inputs(cfg), _step_with(_eager_block(cfg), cfg),
                                   check_step=_step_with(_eager_block(_without_dropout(cfg)), _without_dropout(cfg))),
                  _compile_provider(cfg)]
    low = harness.low_precision(dtype)
    tol = {"*": (0.0, 3e-2)} if low else {"*": (1e-5, 1e-4)}
    elem = dtype.itemsize
    return harness.op_benchmark(
        "adapter", cfg, providers,
        description=(f"{cfg['dtype']} N={n} H={h} r={r} {cfg['activation']} dropout={cfg['dropout']}, "
                     "step = forward + backward"),
        # x and g read, y and dx written: the floor for any implementation (weights are small)
        bytes_per_step=4 * n * h * elem,
        flops_per_step=6 * 2 * n * h * r,
        tolerances=tol,
        notes=[
            "GB/s counts x and the upstream gradient read once and y and dx written once (4*N*H*element size).",
            "TFLOP/s counts the six N x H x r GEMMs of forward + backward.",
            "The outputs compared (max diff) come from a step with dropout off: the providers draw different masks.",
        ],
        check_note="dropout off" if cfg["dropout"] > 0 else "",
    )


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
