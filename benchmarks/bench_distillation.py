"""Distillation loss at SmolLM2's vocabulary: fastft.rl.distillation_loss (linear_full_kl from both models'
hidden states, neither [N, V] logits held) against the stock loss, ``F.kl_div`` on full log-softmaxed logits
of both heads. Same inputs, same run: loss difference (fp32), time per forward+backward (interleaved
rounds, median) and peak bytes of the tensors each creates (counted by a dispatch-mode tracker, not
sampled), student gradients included.

``--mode mixed`` (mix * KL(teacher || student) + (1 - mix) * KL(student || teacher)) adds the earlier fused
path as a third provider: two linear_full_kl calls, one per direction (4 head GEMMs forward, two kernel
sweeps), against distillation_loss's single reverse_weight pass.

    python -m benchmarks.bench_distillation [--tokens 2048] [--vocab 49152] [--rounds 3] [--mode forward]
                                            [--mix 0.5] [--out FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_static.memory_plan import LiveBytes
from benchmarks.harness import emit_text_report, interleave, loss_time_memory_table
from fastft import rl
from fastft.ops import linear_full_kl

STUDENT_HIDDEN, TEACHER_HIDDEN = 576, 960  # SmolLM2-135M and SmolLM2-360M (vocabulary 49152 both)


def stock_loss(hs, ws, ht, wt, mode="forward", mix=0.5):
    log_student = torch.log_softmax(hs @ ws.T, -1)
    with torch.no_grad():
        log_teacher = torch.log_softmax(ht @ wt.T, -1)
    forward = lambda: F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")  # noqa: E731
    reverse = lambda: F.kl_div(log_teacher, log_student, log_target=True, reduction="batchmean")  # noqa: E731
    if mode == "forward":  # KL(teacher || student)
        return forward()
    if mode == "reverse":  # KL(student || teacher)
        return reverse()
    return mix * forward() + (1 - mix) * reverse()


def fastft_loss(hs, ws, ht, wt, mode="forward", mix=0.5):
    return rl.distillation_loss(hs, ws, ht, wt, mode=mode, mix=mix)


def fastft_two_passes(hs, ws, ht, wt, mode="mixed", mix=0.5):
    """The mixed loss as distillation_loss computed it before reverse_weight: one linear_full_kl per direction."""
    forward = linear_full_kl(ht.detach(), wt.detach(), hs, ws)
    reverse = linear_full_kl(hs, ws, ht.detach(), wt.detach())
    return mix * forward + (1 - mix) * reverse


def providers(mode: str) -> dict:
    chosen = {"stock F.kl_div on full logits": stock_loss, "fastft.rl.distillation_loss": fastft_loss}
    if mode == "mixed":
        chosen["fastft, two linear_full_kl passes (before)"] = fastft_two_passes
    return chosen


def inputs(tokens: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(tokens, STUDENT_HIDDEN, generator=g).requires_grad_()
    ws = (torch.randn(vocab, STUDENT_HIDDEN, generator=g) * 0.05).requires_grad_()
    ht = torch.randn(tokens, TEACHER_HIDDEN, generator=g)
    wt = torch.randn(vocab, TEACHER_HIDDEN, generator=g) * 0.05
    return hs, ws, ht, wt


def step(fn, args):
    for t in args[:2]:
        t.grad = None
    loss = fn(*args)
    loss.backward()
    return loss.detach()


def peak_bytes(fn, args) -> float:
    for t in args[:2]:
        t.grad = None
    with LiveBytes() as tracker:
        fn(*args).backward()
    return tracker.peak


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8 * 256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=rl.DISTILLATION_MODES, default="forward")
    parser.add_argument("--mix", type=float, default=0.5, help="mixed mode: weight of KL(teacher || student)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    data = inputs(args.tokens, args.vocab)
    chosen = {name: (lambda *a, fn=fn: fn(*a, mode=args.mode, mix=args.mix)) for name, fn in
              providers(args.mode).items()}
    losses = {name: step(fn, data) for name, fn in chosen.items()}  # also the warm-up
    # interleaved: load drift hits every provider alike
    times = interleave({name: (lambda r, fn=fn: step(fn, data)) for name, fn in chosen.items()}, args.rounds,
                       warmup_rounds=0, alternate=True)
    peaks = {name: peak_bytes(fn, data) for name, fn in chosen.items()}
    stock, ours = list(chosen)[:2]
    what = {"forward": "forward KL(teacher || student)", "reverse": "reverse KL(student || teacher)",
            "mixed": f"mixed {args.mix:g} KL(teacher || student) + {1 - args.mix:g} KL(student || teacher)"}
    lines = [f"Distillation, {what[args.mode]}: {args.tokens} tokens, vocabulary {args.vocab}, "
             f"student H={STUDENT_HIDDEN}, teacher H={TEACHER_HIDDEN}, fp32, CPU "
             f"({torch.get_num_threads()} threads), {args.rounds} interleaved rounds, forward + backward",
             "", *loss_time_memory_table(losses, times, peaks, stock)]
    diff = (losses[ours] - losses[stock]).abs().item()
    lines += ["", f"|loss difference| = {diff:.2e} (relative {diff / losses[stock].abs().item():.2e})"]
    return emit_text_report(lines, args.out)


if __name__ == "__main__":
    main()
