"""`make demo`: the main job. A LoRA fine-tune with fastft's kernels, then the same steps with them off
(stock transformers + PEFT, eager), each in a fresh process; prints held-out accuracy before and after,
and tokens/s and peak memory side by side; writes PNG curves.

    python -m benchmarks.demo recipes/instruction_tuning.toml [--quick] [--section.key=value ...]

It measures, so it lives with the benchmarks: the runtime (fastft.runtime) only trains and records each run's
figures (summary.json, metrics.jsonl), which this reads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fastft.runtime.config import load_config

QUICK = ["--run.max_steps=4", "--data.num_eval=10", "--eval.batch_size=10", "--optim.warmup_steps=1"]
# The baseline evaluates at the start too: that eval leaves memory in the allocator that the steps then
# reuse, so both runs must have it for their training memory to compare.
BASELINE = ["--kernels.enabled=false", "--eval.at_end=false", "--checkpoint.at_end=false",
            "--run.export_methods=false", "--run.plots=false"]


def _run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "fastft", "train", *args, "--run.resume=false", "--run.overwrite=true"]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit code {proc.returncode}")


def _convert_once(cfg) -> None:
    """Dequantize the GGUF model into model.convert_cache before the timed runs, so neither run's peak
    memory includes the conversion."""
    m = cfg.model
    if m.gguf_file and m.convert_cache and not (Path(m.convert_cache) / "config.json").is_file():
        from fastft.runtime.models import build_model

        print(f"converting {m.gguf_file} to safetensors in {m.convert_cache} (once)", flush=True)
        build_model(cfg)


def _training_figures(out: Path) -> dict:
    from fastft.runtime.plots import read_metrics

    summary = json.loads((out / "summary.json").read_text())
    train, _ = read_metrics(out / "metrics.jsonl")
    summary["step_memory_mb"] = summary["peak_memory_mb"] - summary["resident_memory_mb"]
    summary["losses"] = [r["loss"] for r in train]
    return summary


def _plot(fast: dict, eager: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(range(1, len(fast["losses"]) + 1), fast["losses"], label="fastft kernels")
    axes[0].plot(range(1, len(eager["losses"]) + 1), eager["losses"], "--", label="transformers + PEFT (eager)")
    axes[0].set_title("train loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    names = ["fastft", "HF + PEFT"]
    axes[1].bar(names, [fast["seconds_per_step"] * 1e3, eager["seconds_per_step"] * 1e3], color=["C0", "C1"])
    axes[1].set_title("ms per optimizer step (lower is better)")
    resident = [fast["resident_memory_mb"], eager["resident_memory_mb"]]
    axes[2].bar(names, resident, color="0.7", label="loaded model (weights, libraries)")
    axes[2].bar(names, [fast["step_memory_mb"], eager["step_memory_mb"]], bottom=resident, color=["C0", "C1"],
                label="training steps")
    axes[2].set_title("peak memory while training, MiB (CPU: RSS)")
    axes[2].legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _load_average() -> list:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def expected_duration(root: Path, quick: bool) -> str:
    """The duration of the last run of this variant in ``root`` (each run records its own in
    comparison.json), with that run's load average: a figure measured on this machine, never a typed-in
    one. A first run has none to go by."""
    try:
        last = json.loads((root / "comparison.json").read_text())
    except (OSError, ValueError):
        last = {}
    if last.get("quick") != quick or "demo_seconds" not in last:
        return "unknown until a first run here (each run records its duration in comparison.json)"
    load = last.get("load_average_at_start") or []
    at = f" at load average {load[0]:.1f}" if load else ""
    return f"about {last['demo_seconds']:.0f} s (the last {'quick ' if quick else ''}run in {root}/ took that{at})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    if not argv or argv[0].startswith("--"):
        raise SystemExit("usage: python -m benchmarks.demo RECIPE.toml [--quick] [--section.key=value ...]")
    recipe, overrides = argv[0], argv[1:] + (QUICK if quick else [])
    cfg = load_config(recipe, overrides)
    root = Path(cfg.run.output_dir).parent
    fast_dir, eager_dir = root / "fastft", root / "eager"
    print(f"fastft demo ({'quick' if quick else 'full'}): LoRA fine-tune of {cfg.model.gguf_file or cfg.model.path}, "
          f"{cfg.run.max_steps} steps, then the same steps with fastft's kernels off.\n"
          f"Expected duration: {expected_duration(root, quick)}. Outputs: {root}/", flush=True)
    start, load_at_start = time.time(), _load_average()
    _convert_once(cfg)
    print("\n== 1/2: fastft kernels on (fused LoRA layers, fused linear cross-entropy head)", flush=True)
    _run([recipe, *overrides, f"--run.output_dir={fast_dir}"])
    print("\n== 2/2: kernels off (stock transformers + PEFT, eager), same steps", flush=True)
    _run([recipe, *overrides, f"--run.output_dir={eager_dir}", *BASELINE])
    fast, eager = _training_figures(fast_dir), _training_figures(eager_dir)
    before = fast.get("eval_start", {}).get("exact_match")
    after = fast.get("eval_end", {}).get("exact_match")
    print("\n== Result")
    if before is not None and after is not None:
        print(f"held-out exact-match accuracy: {before:.2f} before -> {after:.2f} after {fast['steps']} LoRA steps")
    rows = [("ms / optimizer step", "seconds_per_step", 1e3, "{:.0f}"), ("tokens / s", "tokens_per_s", 1, "{:.0f}"),
            ("peak memory while training, MiB", "peak_memory_mb", 1, "{:.0f}"),
            ("  of it above the loaded model", "step_memory_mb", 1, "{:.0f}"), ("final train loss", "final_loss", 1, "{:.4f}")]
    print(f"{'':<30}{'fastft':>12}{'HF + PEFT':>12}{'ratio':>8}")
    for label, key, scale, fmt in rows:
        a, b = fast[key] * scale, eager[key] * scale
        print(f"{label:<30}{fmt.format(a):>12}{fmt.format(b):>12}{a / b:>8.2f}")
    _plot(fast, eager, root / "comparison.png")
    seconds = time.time() - start
    (root / "comparison.json").write_text(json.dumps({"fastft": fast, "eager": eager, "quick": quick,
                                                      "demo_seconds": seconds, "load_average_at_start": load_at_start},
                                                     indent=2))
    print(f"curves: {fast_dir / 'curves.png'}, {root / 'comparison.png'}; LoRA adapter (PEFT format): {fast_dir / 'lora'}")
    print(f"demo took {seconds:.0f} s (load average {', '.join(map(str, load_at_start))} at the start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
