"""TRL's SFTTrainer + PEFT LoRA with fastft's one switch (``FastftCallback``) vs stock vs ``use_liger_kernel=True``.

The whole trainer step as a user runs it (``trainer.train()``: forward, SFTTrainer's loss and its entropy /
mean_token_accuracy metrics, backward, AdamW step), on a config-built Llama with a realistic vocabulary
(hidden 256, intermediate 688, 2 layers, vocab 32000, batch 2 x 256 tokens; LoRA r=16 on all linears), fp32.

Providers:
  stock    SFTTrainer as shipped (TRL's own chunked fused head for the loss and metrics)
  fastft   the same trainer with ``callbacks=[FastftCallback()]``: fastft's fused LoRA, RMSNorm and SwiGLU
           layers and TRL's head calls routed to fastft's fused linear cross-entropy + metrics pass
  fastft-layers-only  ``FastftCallback(trl=False)``: the fused layers, TRL's own head (splits the gain)
  liger    ``SFTConfig(use_liger_kernel=True)`` (TRL keeps its own head and turns Liger's off; Liger adds
           its RMSNorm / SwiGLU / RoPE Triton kernels): CUDA only, since Liger's kernels are Triton and
           the CPU has no Triton driver (the interpreter is a debugging tool, not a peer)

Step time: all providers in one process, interleaved (``--rounds`` rounds, the order rotated every round,
``--steps`` timed steps each after one untimed one), so that a shared machine's load hits every provider
alike; reported as median / p20 / p80 and as ratios to stock. Peak memory: each provider alone in a child
process (peak RSS, ``ru_maxrss``, on the CPU; ``torch.cuda.max_memory_allocated`` on CUDA), as the
training's rise over the memory held before ``train()`` and as the process total.

    python -m benchmarks.bench_hf_trainer                      # CPU, writes benchmarks/out/hf_trainer_cpu.md
    python -m benchmarks.bench_hf_trainer --out benchmarks/results/hf_trainer_cpu.md
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 688, 2, 4, 2, 32000
BATCH, SEQ, RANK = 2, 256, 16
PROVIDERS = ("stock", "fastft", "fastft-layers-only", "liger")
ROOT = Path(__file__).resolve().parent.parent


def unavailable_reason(provider: str, device: str) -> str:
    if provider != "liger":
        return ""
    if device != "cuda":
        return "Liger's kernels are Triton: no CPU driver (TRITON_INTERPRET is a debugger, not a peer)"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger_kernel is not installed"
    return ""


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


class StepTimer:
    """A TrainerCallback recording the wall time of every training step."""

    def __init__(self, device: str) -> None:
        import transformers

        class _Timer(transformers.TrainerCallback):
            def on_step_begin(cb, args, state, control, **kwargs):
                _sync(device)
                cb.start = time.perf_counter()

            def on_step_end(cb, args, state, control, **kwargs):
                _sync(device)
                self.times.append(time.perf_counter() - cb.start)

        self.times: list = []
        self.callback = _Timer()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_trainer(provider: str, device: str, model_dir: str, out_dir: str, steps: int, timer: StepTimer):
    import datasets
    import peft
    import transformers
    import trl

    from fastft.integrations.hf_trainer import FastftCallback

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(3, VOCAB, (BATCH * (steps + 1), SEQ), generator=gen).tolist()
    data = datasets.Dataset.from_dict({"input_ids": rows})
    args = trl.SFTConfig(output_dir=out_dir, max_steps=steps + 1, per_device_train_batch_size=BATCH,
                         max_length=SEQ, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                         use_cpu=device == "cpu", bf16=False, seed=0, use_liger_kernel=provider == "liger")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    lora = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    # the TRL patch is global: the interleaving loop switches it per provider (FastftCallback(trl=False))
    callbacks = [timer.callback] + ([FastftCallback(trl=False)] if provider.startswith("fastft") else [])
    return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(),
                          peft_config=lora, callbacks=callbacks)


def save_model(model_dir: str) -> None:
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)


def run_steps(trainer, provider: str) -> list:
    """One ``train()`` of ``steps + 1`` steps, with TRL routed to fastft for the fastft provider only."""
    import fastft.integrations.trl as fastft_trl

    handle = fastft_trl.patch() if provider == "fastft" else None
    try:
        trainer.train()
    finally:
        if handle is not None:
            handle.undo()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def time_interleaved(providers: list, device: str, model_dir: str, steps: int, rounds: int) -> dict:
    timers = {p: StepTimer(device) for p in providers}
    with tempfile.TemporaryDirectory() as out:
        trainers = {p: build_trainer(p, device, model_dir, out, steps, timers[p]) for p in providers}
        losses = {}
        for r in range(rounds):
            order = providers[r % len(providers):] + providers[:r % len(providers)]
            for p in order:
                before = len(timers[p].times)
                losses[p] = run_steps(trainers[p], p)
                del timers[p].times[before]  # the first step of each train(): optimizer and dataloader setup
    return {p: {"times": timers[p].times, "losses": losses[p]} for p in providers}


def child_memory(provider: str, device: str, model_dir: str, steps: int) -> dict:
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(provider, device, model_dir, out, steps, timer)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
            run_steps(trainer, provider)
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {"before_mb": before, "peak_mb": peak, "rise_mb": peak - before}
        before = _rss_mb()
        run_steps(trainer, provider)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {"before_mb": before, "peak_mb": peak, "rise_mb": peak - before}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _quantile(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def report(device: str, timing: dict, memory: dict, skipped: dict, args) -> str:
    stock = statistics.median(timing["stock"]["times"])
    lines = [f"# SFTTrainer + PEFT LoRA step: fastft's switch vs stock vs Liger ({device.upper()} numbers)", "",
             f"Llama from a config: hidden {HIDDEN}, intermediate {INTERMEDIATE}, {LAYERS} layers, vocab {VOCAB}; "
             f"batch {BATCH} x {SEQ} tokens; LoRA r={RANK} on all linears; fp32; "
             f"{args.threads} torch thread(s). Step = trainer.train() step (forward, loss + entropy + "
             "accuracy metrics, backward, AdamW).",
             f"Time: {args.rounds} interleaved rounds x {args.steps} steps per provider in one process (first "
             "step of each round dropped). Memory: each provider alone in a child process "
             f"({'peak RSS' if device == 'cpu' else 'max_memory_allocated'}); rise = peak - before train().", "",
             "| provider | median ms | p20 ms | p80 ms | time vs stock | peak rise MiB | rise vs stock | "
             "process peak MiB | final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p, t in timing.items():
        med, m = statistics.median(t["times"]), memory[p]
        lines.append(f"| {p} | {med * 1e3:.1f} | {_quantile(t['times'], .2) * 1e3:.1f} | "
                     f"{_quantile(t['times'], .8) * 1e3:.1f} | {med / stock:.2f}x | {m['rise_mb']:.0f} | "
                     f"{m['rise_mb'] / memory['stock']['rise_mb']:.2f}x | {m['peak_mb']:.0f} | "
                     f"{t['losses'][-1]:.4f} |")
    for p, why in skipped.items():
        lines.append(f"| {p} | n/a | | | | | | | {why} |")
    lines += ["", "On the CPU, stock's head is TRL's torch fallback of its Triton kernel (every position scored, "
              "fp32 [tokens, 32768] tiles with several elementwise passes); on CUDA TRL runs the Triton kernel, so "
              "this ratio does not carry over to a GPU: measure there with `--device cuda` (Liger included).",
              "", f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"python {platform.python_version()}; command: `python -m benchmarks.bench_hf_trainer "
              f"--rounds {args.rounds} --steps {args.steps} --threads {args.threads}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per provider per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="default: benchmarks/out/hf_trainer_<device>.md")
    parser.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args.child, args.device, args.model_dir, args.steps)))
        return 0
    skipped = {p: unavailable_reason(p, args.device) for p in PROVIDERS if unavailable_reason(p, args.device)}
    providers = [p for p in PROVIDERS if p not in skipped]
    with tempfile.TemporaryDirectory() as model_dir:
        save_model(model_dir)
        memory = {}
        for p in providers:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_hf_trainer", "--child", p, "--device",
                                   args.device, "--model-dir", model_dir, "--steps", str(args.steps),
                                   "--threads", str(args.threads)], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{p} child failed:\n{proc.stderr[-3000:]}")
            memory[p] = json.loads(proc.stdout.strip().splitlines()[-1])
        timing = time_interleaved(providers, args.device, model_dir, args.steps, args.rounds)
    text = report(args.device, timing, memory, skipped, args)
    args.out = args.out or ROOT / "benchmarks" / "out" / f"hf_trainer_{args.device}.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
