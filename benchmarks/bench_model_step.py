"""A LoRA training step of a config-built Llama: what fastft's pieces change inside the model step.

One step = forward with labels + loss + backward into the LoRA parameters (the base is frozen). The
model is built from a config (no download); the first ``prompt`` tokens of every row are labelled -100
(an instruction-tuning batch: the loss is on the response only). LoRA r=16, alpha 32 on q, k, v, o,
gate, up and down; PEFT keeps the adapters in fp32 on a bf16 base (its default), and lora_B starts
random so that every A and B gets a gradient to compare.

Providers (each on the same PEFT model and parameters):
  peft+stock          PEFT's LoRA layers and transformers' own loss (the reference and the baseline)
  peft+fastft-head    fastft.patch(model, lora=False, layers=False): the fused linear cross-entropy head
  fastft-lora+stock   fastft.patch(model, loss=False, layers=False): fastft's fused LoRA layers
  fastft              fastft.patch(model): LoRA layers, head, fused RMSNorm and SwiGLU MLP
  liger               Liger-Kernel's apply_liger_kernel_to_llama (its fused head, RMSNorm, SwiGLU, RoPE)
                      with PEFT's LoRA, where liger_kernel is importable (CUDA only). It patches
                      transformers' module functions globally, so it is built last.

Shapes (``--model``): on CUDA ``llama32k`` (hidden 1024, intermediate 2816, 8 layers, 16 heads / 4 kv
heads, vocab 32000, batch 8 x 512) and ``llama128k`` (the same with vocab 128256, batch 8 x 1024); on
the CPU a small model by default (``small``; ``--quick`` smaller still).
"""
from __future__ import annotations

import argparse
import re
import sys

import torch

from benchmarks import harness

MODELS = {  # hidden, intermediate, layers, heads, kv heads, vocab, batch, seq, prompt tokens
    "llama32k": (1024, 2816, 8, 16, 4, 32000, 8, 512, 128),
    "llama128k": (1024, 2816, 8, 16, 4, 128256, 8, 1024, 128),
    "small": (256, 704, 2, 4, 2, 8192, 4, 128, 32),
    "tiny": (64, 176, 1, 4, 2, 1024, 2, 48, 12),
}
DEFAULT_MODEL = {("cuda", False): "llama32k", ("cuda", True): "llama32k", ("cpu", False): "small",
                 ("cpu", True): "tiny"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fastft.patch parts per provider (None: not patched)
PATCHES = {"peft+stock": None, "peft+fastft-head": dict(lora=False, layers=False),
           "fastft-lora+stock": dict(loss=False, layers=False), "fastft": {}}


def add_arguments(p) -> None:
    g = p.add_argument_group("model step")
    g.add_argument("--model", choices=tuple(MODELS), help="the shape (default: llama32k on CUDA, small on CPU)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="the base model's dtype (default: bf16 on CUDA)")
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args, device: str) -> dict:
    return make_config(device, model=args.model, quick=bool(args.quick), seed=args.seed,
                       **({"dtype": args.dtype} if args.dtype else {}))


def make_config(device: str = "cpu", model: str | None = None, quick: bool = False, **overrides) -> dict:
    name = model or DEFAULT_MODEL[(device, quick)]
    h, inter, layers, heads, kv, vocab, batch, seq, prompt = MODELS[name]
    cfg = {"device": device, "quick": quick, "model": name, "seed": 0, "hidden": h, "intermediate": inter,
           "layers": layers, "heads": heads, "kv_heads": kv, "vocab": vocab, "batch": batch, "seq": seq,
           "prompt": prompt, "r": 16, "lora_alpha": 32, "dtype": "bfloat16" if device == "cuda" else "float32"}
    cfg.update(overrides)
    return cfg


def _state(cfg: dict, patch: dict | None, liger=None) -> dict:
    """The PEFT model patched by ``fastft.patch(**patch)`` (None: not), or by Liger's ``liger`` patcher."""
    import peft
    import transformers

    torch.manual_seed(cfg["seed"])
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    config = transformers.LlamaConfig(
        hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], vocab_size=cfg["vocab"],
        max_position_embeddings=cfg["seq"],
    )
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if liger is not None:
        liger(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    report = None
    if patch is not None:
        import fastft

        report = fastft.patch(model, **patch).report
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
    labels = ids.clone()
    labels[:, : cfg["prompt"]] = -100
    lora = [p for n, p in model.named_parameters() if "lora_" in n]  # the same order in every provider
    return {"model": model, "ids": ids.to(device), "labels": labels.to(device), "lora": lora, "patch": report}


def _step(st: dict):
    loss = st["model"](input_ids=st["ids"], labels=st["labels"]).loss
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1).float() for p in st["lora"]])
    for p in st["lora"]:
        p.grad = None
    return {"loss": loss.detach().float(), "lora_grads": grads}


def build(cfg: dict) -> harness.Benchmark:
    providers = [harness.Provider(name, (lambda parts=parts: _state(cfg, parts)), _step) for name, parts in PATCHES.items()]
    providers.append(harness.liger_provider(cfg["device"], "apply_liger_kernel_to_llama",
                                            lambda apply: _state(cfg, None, liger=apply), _step))
    low = cfg["dtype"] != "float32"
    tol = {"loss": (0.0, 2e-2), "lora_grads": (0.0, 5e-2)} if low else {"loss": (1e-5, 1e-5), "lora_grads": (1e-6, 1e-3)}
    tokens = cfg["batch"] * cfg["seq"]
    return harness.Benchmark(
        op="model_step", device=cfg["device"], config=cfg, providers=providers,
        description=(f"{cfg['dtype']} Llama ({cfg['model']}: hidden {cfg['hidden']}, {cfg['layers']} layers, "
                     f"{cfg['heads']}/{cfg['kv_heads']} heads, vocab {cfg['vocab']}), batch {cfg['batch']} x "
                     f"{cfg['seq']} with the first {cfg['prompt']} tokens of each row unlabelled, LoRA r={cfg['r']} on "
                     "q,k,v,o,gate,up,down; step = forward + loss + backward"),
        reference="peft+stock", baselines=("peft+stock",), tolerances=tol, tokens_per_step=tokens,
        notes=["Every provider is the same PEFT model with the same parameters, patched in place; checked before "
               "timing: the loss and every LoRA A/B gradient against peft+stock.",
               "peak extra MB: the step's peak above the memory held between steps (weights, adapters, inputs)."],
    )


# ------------------------------------------------------------------------------------------------
# `profile`: where the step's time goes (benchmarks/gpu_check.sh writes it into summary.md)
# ------------------------------------------------------------------------------------------------

# The fused heads' ops and autograd nodes as the profiler names them: fastft's registered op
# (fastft::linear_cross_entropy and its backward) and Liger's autograd Function.
HEAD_EVENTS = re.compile(r"linear_cross_entropy|LinearCrossEntropy", re.IGNORECASE)


def _self_time_us(avg, on_device: bool) -> float:
    if on_device:  # torch >= 2.4 names it device time; older releases cuda time
        return float(getattr(avg, "self_device_time_total", getattr(avg, "self_cuda_time_total", 0.0)))
    return float(avg.self_cpu_time_total)


def top_kernels(prof, limit: int = 15, on_device: bool = True) -> list[tuple[str, int, float]]:
    """[(name, calls, total ms)] of the ``limit`` events with the most self time: on the device (the CUDA
    kernels and copies), or on the CPU (the ops, for a CPU profile)."""
    rows = []
    for avg in prof.key_averages():
        ms = _self_time_us(avg, on_device) / 1000.0
        if ms > 0:
            rows.append((avg.key, int(avg.count), ms))
    rows.sort(key=lambda r: r[2], reverse=True)
    return rows[:limit]


def head_span_ms(prof) -> tuple[float, int] | None:
    """(ms from the start of the first fused-head event to the end of the last one, events found), from the
    profiler's timeline (CPU side: the ops and autograd nodes that launch the head's kernels); None when the
    step has no fused head."""
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if HEAD_EVENTS.search(e.name)]
    if not spans:
        return None
    return (max(end for _, end in spans) - min(start for start, _ in spans)) / 1000.0, len(spans)


def profile_table(name: str, prof, steps: int, limit: int = 15, on_device: bool = True) -> str:
    """Markdown: the top kernels of ``steps`` profiled steps of one provider, and its fused-head span."""
    where = "CUDA" if on_device else "CPU"
    lines = [f"#### {name}", "", f"Top {limit} by self {where} time over {steps} step(s):", "",
             "| kernel / op | calls | total ms | ms per step |", "|---|---:|---:|---:|"]
    for kernel, calls, ms in top_kernels(prof, limit, on_device):
        lines.append(f"| `{kernel[:110]}` | {calls} | {ms:.3f} | {ms / steps:.3f} |")
    span = head_span_ms(prof)
    lines.append("")
    if span is None:
        lines.append("Fused head: none in this step (no linear_cross_entropy op or autograd node).")
    else:
        lines.append(f"Fused head: first to last of its {span[1]} events: {span[0]:.3f} ms over {steps} step(s) "
                     f"({span[0] / steps:.3f} ms per step, wall time on the host timeline).")
    return "\n".join(lines) + "\n"


def profile_providers(cfg: dict, names=None, steps: int = 3, warmup: int = 2, limit: int = 15) -> str:
    """Profiles ``steps`` steps of each provider after ``warmup`` unprofiled ones; markdown."""
    from torch.profiler import ProfilerActivity, profile

    on_device = cfg["device"] == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    out = [f"### Model step profile ({cfg['model']}, {cfg['dtype']}, batch {cfg['batch']} x {cfg['seq']}, "
           f"vocab {cfg['vocab']})", ""]
    for provider in build(cfg).providers:
        if names and provider.name not in names:
            continue
        if provider.available is not None:
            ok, why = provider.available()
            if not ok:
                out.append(f"#### {provider.name}\n\nnot available: {why}\n")
                continue
        state = provider.setup()
        for _ in range(warmup):
            provider.step(state)
        if on_device:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                provider.step(state)
            if on_device:
                torch.cuda.synchronize()
        out.append(profile_table(provider.name, prof, steps, limit, on_device))
        del state
        if on_device:
            torch.cuda.empty_cache()
    return "\n".join(out)


def profile_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_model_step profile",
                                description="torch.profiler tables of the model step, per provider (markdown)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=tuple(MODELS))
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--provider", action="append", help="only these providers (default: all)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", help="write the markdown here (default: stdout)")
    args = p.parse_args(argv)
    cfg = make_config(args.device, model=args.model, **({"dtype": args.dtype} if args.dtype else {}))
    text = profile_providers(cfg, args.provider, args.steps, args.warmup, args.top)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["profile"]:
        sys.exit(profile_main(sys.argv[2:]))
    sys.exit(harness.main(sys.modules[__name__]))
