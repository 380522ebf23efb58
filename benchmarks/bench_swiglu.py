"""SwiGLU's gated product silu(gate) * up, forward + backward: fastft vs eager torch (as Hugging Face's LlamaMLP
writes it), torch.compile of that, and Liger-Kernel's LigerSiLUMulFunction.

One step = forward and backward of the product on gate and up [N, I] that require grad (what the MLP's
gate_proj and up_proj hand it), with a fixed random upstream gradient; the step returns the product and both
gradients (and resets the .grad fields). The projections themselves are not timed: they are the same GEMMs for
every provider. Default shapes: CPU fp32 N=4096, I=5632 (the issue's target, "4096 x 2 x 5632": gate and up);
CUDA bf16 N=16384, I=14336 (Llama-3-8B's MLP width).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness

DEFAULTS = {  # (N, I, dtype)
    ("cpu", False): (4096, 5632, "float32"),
    ("cuda", False): (16384, 14336, "bfloat16"),
    ("cpu", True): (1024, 1408, "float32"),
    ("cuda", True): (4096, 5632, "bfloat16"),
}
FASTFT_BACKENDS = ("cpp", "triton", "cuda")


def add_arguments(p) -> None:
    g = p.add_argument_group("swiglu")
    g.add_argument("--n", type=int, help="rows (tokens); default 4096 CPU, 16384 CUDA")
    g.add_argument("--intermediate", type=int, help="MLP width; default 5632 CPU, 14336 CUDA")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--compile-mode", default=None)
    g.add_argument("--seed", type=int, default=0)


def make_config(device: str = "cpu", **overrides) -> dict:
    n, i, dtype = DEFAULTS[(device, bool(overrides.get("quick", False)))]
    cfg = {"device": device, "quick": False, "n": n, "intermediate": i, "dtype": dtype, "compile_mode": None,
           "seed": 0}
    cfg.update(overrides)
    return cfg


def config_from_args(args, device: str) -> dict:
    cfg = make_config(device, quick=bool(args.quick))
    for key in ("n", "intermediate", "dtype"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(compile_mode=args.compile_mode, seed=args.seed)
    return cfg


def _inputs(cfg: dict) -> dict:
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    shape = (cfg["n"], cfg["intermediate"])
    gate, up, grad = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(3))
    return {"gate": gate.requires_grad_(True), "up": up.requires_grad_(True), "grad": grad}


def _eager(gate, up):
    return F.silu(gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)


def _step(fn):
    """A step running ``fn(state) -> out`` forward and backward."""

    def step(st):
        out = fn(st)
        out.backward(st["grad"])
        result = {"out": out.detach(), "d_gate": st["gate"].grad, "d_up": st["up"].grad}
        st["gate"].grad = None
        st["up"].grad = None
        return result

    return step


def _fastft_provider(cfg: dict, backend: str) -> harness.Provider:
    from fastft.ops.defs.swiglu import swiglu, swiglu_op

    step = _step(lambda st: swiglu(st["gate"], st["up"]))
    return harness.fastft_backend_provider(cfg["device"], backend, lambda: _inputs(cfg), step,
                                           swiglu_op.backends[backend].status)


def _compile_provider(cfg: dict) -> harness.Provider:
    return harness.torch_compile_provider(cfg, lambda: _inputs(cfg), lambda st: _eager,
                                          _step(lambda st: st["compiled"](st["gate"], st["up"])))


def _liger_provider(cfg: dict) -> harness.Provider:
    # liger_kernel.transformers.functional.liger_swiglu = LigerSiLUMulFunction.apply, what LigerSwiGLUMLP calls.
    def setup(functional):
        return {**_inputs(cfg), "liger_swiglu": functional.liger_swiglu}

    return harness.liger_provider(cfg["device"], "functional", setup,
                                  _step(lambda st: st["liger_swiglu"](st["gate"], st["up"])),
                                  note="liger_swiglu (LigerSiLUMulFunction)")


def build(cfg: dict) -> harness.Benchmark:
    n, i = cfg["n"], cfg["intermediate"]
    dtype = getattr(torch, cfg["dtype"])
    providers = [_fastft_provider(cfg, b) for b in FASTFT_BACKENDS]
    providers += [
        harness.Provider("torch-eager", lambda: _inputs(cfg), _step(lambda st: _eager(st["gate"], st["up"]))),
        _compile_provider(cfg),
        _liger_provider(cfg),
    ]
    low = harness.low_precision(dtype)
    elem = dtype.itemsize
    return harness.op_benchmark(
        "swiglu", cfg, providers,
        description=f"{cfg['dtype']} N={n} I={i} (gate and up), step = forward + backward",
        # forward reads gate and up and writes the product; backward reads dout, gate and up and writes both
        # gradients: the floor for any implementation
        bytes_per_step=8 * n * i * elem,
        tolerances={"*": (0.0, 2e-2)} if low else {"*": (1e-5, 1e-4)},
        notes=[
            "torch-eager is F.silu(gate) * up, as transformers' LlamaMLP computes it between its projections; "
            "torch-compile is the same function under torch.compile(fullgraph=True), warmed up.",
            "GB/s counts gate and up read twice, dout read once and the product and both gradients written once "
            "(8*N*I*element size).",
        ],
    )


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
