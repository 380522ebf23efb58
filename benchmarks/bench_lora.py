"""LoRA linear: fastft vs PEFT's LoRA Linear (eager, torch.compile) and the frozen base Linear alone.

Two cases (``--case``; by default both run, one result file each):
  layer  one LoRA Linear, step = forward + backward with the base weight frozen and x requiring grad
         (x, A, B get gradients). Default: CPU fp32 x [2048, 4096] -> 4096, r = 16; CUDA bf16 [8192, 4096].
         Providers: fastft (cpp on CPU, triton on CUDA), peft-eager, peft-compile (torch.compile of PEFT's
         layer), base-frozen (nn.Linear alone: the floor every LoRA layer pays). Target: fastft <= 1.05x the
         floor on CPU, <= 1.08x on a GPU ("vs base-frozen" column < 1: slower than the floor).
         lora_B = 0 as PEFT initializes it, so the floor computes the same y and dx and every provider's y and
         dx are checked against PEFT's (the A/B gradients are checked in tests/test_lora*.py); dense GEMMs do
         not look at values, so zeros cost what random values do.
  llama  one training step (forward, loss, backward) of a small Llama with LoRA (r = 16) on q,k,v,o,gate,up,
         down: fastft (PEFT's model with its LoRA layers swapped by fastft.lora.from_peft: same parameters)
         vs PEFT eager. lora_B is random here (no floor to match), and the loss and the gradients of every
         A and B (concatenated) are checked against PEFT's.
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
LLAMA_DEFAULTS = {  # (hidden, intermediate, layers, heads, vocab, batch, seq, dtype)
    ("cpu", False): (512, 1408, 4, 8, 8192, 4, 256, "float32"),
    ("cuda", False): (2048, 5632, 4, 16, 32000, 4, 1024, "bfloat16"),
    ("cpu", True): (256, 704, 2, 4, 2048, 2, 128, "float32"),
    ("cuda", True): (1024, 2816, 2, 8, 32000, 2, 512, "bfloat16"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_arguments(p) -> None:
    g = p.add_argument_group("lora")
    g.add_argument("--case", choices=("layer", "llama"), default="layer")
    g.add_argument("--n", type=int, help="layer: rows of x (tokens)")
    g.add_argument("--in-features", type=int)
    g.add_argument("--out-features", type=int)
    g.add_argument("--r", type=int, help="LoRA rank (default 16)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args, device: str) -> dict:
    cfg = make_config(device, case=args.case, quick=bool(args.quick), seed=args.seed)
    for key, value in (("n", args.n), ("in_features", args.in_features), ("out_features", args.out_features),
                       ("r", args.r), ("dtype", args.dtype)):
        if value is not None:
            cfg[key] = value
    return cfg


def make_config(device: str = "cpu", case: str = "layer", quick: bool = False, **overrides) -> dict:
    cfg = {"device": device, "quick": quick, "case": case, "seed": 0}
    if case == "layer":
        n, i, o, r, dtype = LAYER_DEFAULTS[(device, quick)]
        cfg.update(n=n, in_features=i, out_features=o, r=r, dtype=dtype, lora_alpha=2 * r)
    else:
        h, inter, layers, heads, vocab, batch, seq, dtype = LLAMA_DEFAULTS[(device, quick)]
        cfg.update(hidden=h, intermediate=inter, layers=layers, heads=heads, vocab=vocab, batch=batch, seq=seq,
                   r=16, lora_alpha=32, dtype=dtype)
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------
# Case "layer"
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Case "llama"
# ------------------------------------------------------------------------------------------------


def _llama_state(cfg: dict, swap: bool):
    import peft
    import transformers

    torch.manual_seed(cfg["seed"])
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    config = transformers.LlamaConfig(
        hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"],
        max_position_embeddings=cfg["seq"],
    )
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                                       target_modules=TARGETS), autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    if swap:
        from fastft.lora import from_peft

        from_peft(model)
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen).to(device)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]  # same order in both models
    return {"model": model, "ids": ids, "lora": lora}


def _llama_step(st: dict):
    loss = st["model"](input_ids=st["ids"], labels=st["ids"]).loss
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in st["lora"]])
    for p in st["lora"]:
        p.grad = None
    return {"loss": loss.detach(), "lora_grads": grads}


def _llama_providers(cfg: dict) -> list:
    return [
        harness.Provider("fastft", lambda: _llama_state(cfg, True), _llama_step),
        harness.Provider("peft-eager", lambda: _llama_state(cfg, False), _llama_step),
    ]


# ------------------------------------------------------------------------------------------------


def build(cfg: dict) -> harness.Benchmark:
    low = cfg["dtype"] in ("bfloat16", "float16")
    if cfg["case"] == "layer":
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
    tol = {"loss": (0.0, 2e-2), "lora_grads": (0.0, 5e-2)} if low else {"loss": (1e-5, 1e-5), "lora_grads": (1e-6, 1e-3)}
    return harness.Benchmark(
        op="lora_llama_step", device=cfg["device"], config=cfg, providers=_llama_providers(cfg),
        description=(f"{cfg['dtype']} Llama hidden {cfg['hidden']}, {cfg['layers']} layers, vocab {cfg['vocab']}, "
                     f"batch {cfg['batch']} x {cfg['seq']}, LoRA r={cfg['r']} on q,k,v,o,gate,up,down; "
                     "step = forward + loss + backward"),
        reference="peft-eager", baselines=("peft-eager",), tolerances=tol,
        notes=["fastft = the same PEFT model with its LoRA layers swapped by fastft.lora.from_peft (same "
               "parameters); checked: the loss and every A/B gradient against PEFT's."],
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--case" in argv:
        return harness.main(sys.modules[__name__], argv)
    status = 0
    for case in ("layer", "llama"):
        status |= harness.main(sys.modules[__name__], argv + ["--case", case])
    return status


if __name__ == "__main__":
    sys.exit(main())
