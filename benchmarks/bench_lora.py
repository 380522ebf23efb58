"""LoRA linear: fastft vs PEFT's LoRA Linear (eager, torch.compile) and the frozen base Linear alone.

One LoRA Linear, step = forward + backward with the base weight frozen and x requiring grad (x, A, B get
gradients). Default: CPU fp32 x [2048, 4096] -> 4096, r = 16; CUDA bf16 [8192, 4096]. Providers: fastft
(cpp on CPU, triton on CUDA), peft-eager, peft-compile (torch.compile of PEFT's layer), base-frozen
(nn.Linear alone: the floor every LoRA layer pays). Target: fastft <= 1.05x the floor on CPU, <= 1.08x on
a GPU ("vs base-frozen" column < 1: slower than the floor). lora_B = 0 as PEFT initializes it, so the
floor computes the same y and dx and every provider's y and dx are checked against PEFT's (the A/B
gradients are checked in tests/test_lora*.py); dense GEMMs do not look at values, so zeros cost what
random values do. The LoRA layers inside a whole model's training step: benchmarks/bench_model_step.py.
"""
from __future__ import annotations

import sys

import torch

from benchmarks import harness

LAYER_DEFAULTS = {  # (N, in, out, r, dtype)
    ("cpu", False): (2048, 4096, 4096, 16, "float32"),
    ("cuda", False): (8192, 4096, 4096, 16, "bfloat16"),
    ("cpu", True): (512, 1024, 1024, 16, "float32"),
    ("cuda", True): (2048, 4096, 4096, 16, "bfloat16"),
}
def add_arguments(p) -> None:
    g = p.add_argument_group("lora")
    g.add_argument("--n", type=int, help="rows of x (tokens)")
    g.add_argument("--in-features", type=int)
    g.add_argument("--out-features", type=int)
    g.add_argument("--r", type=int, help="LoRA rank (default 16)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args, device: str) -> dict:
    cfg = make_config(device, quick=bool(args.quick), seed=args.seed)
    for key, value in (("n", args.n), ("in_features", args.in_features), ("out_features", args.out_features),
                       ("r", args.r), ("dtype", args.dtype)):
        if value is not None:
            cfg[key] = value
    return cfg


def make_config(device: str = "cpu", quick: bool = False, **overrides) -> dict:
    n, i, o, r, dtype = LAYER_DEFAULTS[(device, quick)]
    cfg = {"device": device, "quick": quick, "seed": 0, "n": n, "in_features": i, "out_features": o, "r": r,
           "dtype": dtype, "lora_alpha": 2 * r}
    cfg.update(overrides)
    return cfg


def _layer_inputs(cfg: dict):
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"])
    base = torch.nn.Linear(cfg["in_features"], cfg["out_features"], bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) / cfg["in_features"] ** 0.5)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(cfg["n"], cfg["in_features"], generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(cfg["n"], cfg["out_features"], generator=gen).to(device=device, dtype=dtype)
    lora_A = torch.randn(cfg["r"], cfg["in_features"], generator=gen) / cfg["in_features"] ** 0.5
    return {"base": base, "x": x.requires_grad_(True), "dy": dy, "lora_A": lora_A.to(device=device, dtype=dtype)}


def _peft_layer(st: dict, cfg: dict):
    import peft

    holder = torch.nn.Module()
    holder.lin = st["base"]
    model = peft.get_peft_model(holder, peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                                        target_modules=["lin"]), autocast_adapter_dtype=False)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(st["lora_A"])
    return layer


def _layer_step(st: dict):
    x = st["x"]
    y = st["layer"](x)
    y.backward(st["dy"])
    dx, x.grad = x.grad, None
    for p in st["layer"].parameters():
        p.grad = None
    return {"y": y.detach(), "dx": dx}


def _layer_providers(cfg: dict) -> list:
    device = cfg["device"]
    fastft_backend = "cpp" if device == "cpu" else "triton"

    def fastft_setup():
        from fastft.nn.lora import LoRALinear

        st = _layer_inputs(cfg)
        layer = LoRALinear(st["base"], cfg["r"], cfg["lora_alpha"], adapter_dtype=st["base"].weight.dtype)
        with torch.no_grad():
            layer.lora_A.copy_(st["lora_A"])
        st["layer"] = layer
        return st

    def fastft_available():
        from fastft import backend

        return backend.status(fastft_backend)

    def peft_setup():
        st = _layer_inputs(cfg)
        st["layer"] = _peft_layer(st, cfg)
        return st

    def compile_setup():
        st = peft_setup()
        st["layer"] = torch.compile(st["layer"])  # fwd + bwd compiled on the first (untimed) call
        return st

    def base_setup():
        st = _layer_inputs(cfg)
        st["layer"] = st["base"]
        return st

    def peft_available():
        import peft

        return True, f"peft {peft.__version__}"

    return [
        harness.Provider(f"fastft-{fastft_backend}", fastft_setup, _layer_step, fastft_available),
        harness.Provider("peft-eager", peft_setup, _layer_step, peft_available),
        harness.Provider("peft-compile", compile_setup, _layer_step, peft_available),
        harness.Provider("base-frozen", base_setup, _layer_step),
    ]


def build(cfg: dict) -> harness.Benchmark:
    low = cfg["dtype"] in ("bfloat16", "float16")
    n, i, o, r = cfg["n"], cfg["in_features"], cfg["out_features"], cfg["r"]
    elem = torch.empty((), dtype=getattr(torch, cfg["dtype"])).element_size()
    tol = {"*": (0.0, 2e-2)} if low else {"*": (1e-5, 1e-4)}
    return harness.Benchmark(
        op="lora_linear", device=cfg["device"], config=cfg, providers=_layer_providers(cfg),
        description=f"{cfg['dtype']} x [{n}, {i}] -> {o}, r={r}, base frozen, step = forward + backward (dx, dA, dB)",
        reference="peft-eager", baselines=("base-frozen", "peft-eager"),
        flops_per_step=2 * 2 * n * i * o + 2 * 4 * n * r * (i + o), tolerances=tol,
        notes=["TFLOP/s counts the two base GEMMs (y, dx) and the four thin LoRA products (u, g, dA, dB) "
               "once each; the LoRA-term GEMMs into y and dx (K = r) are not counted.",
               "Outputs checked against peft-eager before timing: y and dx (lora_B = 0, PEFT's init, so the "
               "frozen-base floor computes them too).",
               f"bytes per element {elem}."],
    )


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
