"""TRL's fused-head call on a softcapped head (Gemma-2/3: ``final_logit_softcapping``) asking for log-probs,
entropy and top-1 flags -- SFTTrainer's loss and metrics, GRPO's policy pass -- one forward + backward, stock TRL
against fastft's patch (``fastft.integrations.trl.patch()``), on the CPU. Counted peak: bytes of the tensors the
step creates (LiveBytes; inputs and weights not counted). Time: median of interleaved rounds. CPU figures, not a
GPU claim. Uses only what every fastft version has (the patch and TRL's own head), so the same script measures a
checkout before and after a change:

    PYTHONPATH=<checkout> python benchmarks/trl_softcap_route.py --label after [--tokens 2048 --hidden 512
        --vocab 32768 --softcap 30 --rounds 3 --skip-stock]

Steps: "policy" = loss -sum(logp * a) (entropy and top-1 as metrics: SFT), "policy + entropy bonus" = that
- 0.01 * sum(entropy) (GRPO with entropy_coef); the latter only where the entropy has a gradient.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import trl.trainer.utils as trl_utils

import fastft.integrations.trl as fastft_trl
from benchmarks.gpu_static.memory_plan import LiveBytes

OUTPUTS = ("log_probs", "entropy", "is_top1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--softcap", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-stock", action="store_true", help="only the patched steps (stock TRL is measured "
                        "once, from either checkout)")
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, generator=g) * 3).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    a = torch.randn(args.tokens, generator=g)
    chunk = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE

    def step(entropy_bonus: bool):
        hidden.grad = weight.grad = None
        logp, entropy, _, _, is_top1 = trl_utils._ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, chunk, args.softcap, 1.0, OUTPUTS)
        loss = -(logp * a).sum()
        if entropy_bonus:
            loss = loss - 0.01 * entropy.sum()
        loss.backward()
        return loss.item(), entropy.detach().mean().item(), is_top1.float().mean().item()

    def measure(name: str, entropy_bonus: bool) -> None:
        try:
            values = step(entropy_bonus)  # warm-up, and the values
        except RuntimeError as e:
            print(f"| {args.label} | {name} | raises: {str(e)[:90]}... | | | |")
            return
        grads = hidden.grad.clone(), weight.grad.clone()
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            step(entropy_bonus)
            times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
        with LiveBytes() as tracker:
            step(entropy_bonus)
        results[name, entropy_bonus] = grads
        print(f"| {args.label} | {name} | {statistics.median(times) * 1e3:.0f} | {tracker.peak / 2**20:.0f} | "
              f"loss {values[0]:.6g}, mean entropy {values[1]:.6g}, top-1 {values[2]:.4f} |", flush=True)

    results = {}
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} softcap {args.softcap:g} fp32, CPU "
          f"({torch.get_num_threads()} threads), median of {args.rounds} rounds after one warm-up\n")
    print("| checkout | step | ms | counted peak MiB | values |\n| --- | --- | --- | --- | --- |")
    for entropy_bonus in (False, True):
        what = "policy + entropy bonus" if entropy_bonus else "policy (entropy, top-1 as metrics)"
        if not args.skip_stock:
            measure(f"stock TRL, {what}", entropy_bonus)
        handle = fastft_trl.patch()
        try:
            measure(f"fastft patch, {what}", entropy_bonus)
        finally:
            handle.undo()
        stock, fused = results.get((f"stock TRL, {what}", entropy_bonus)), results.get((f"fastft patch, {what}",
                                                                                         entropy_bonus))
        if stock and fused:
            diff = max((x - y).abs().max().item() for x, y in zip(stock, fused))
            print(f"| {args.label} | max abs grad difference fastft vs stock ({what}) | | | {diff:.2e} |")


if __name__ == "__main__":
    main()
