"""Per-token log-probs AND entropy of a linear head, forward + backward (a policy term plus an entropy bonus),
three ways on the same inputs, interleaved in one process:

  fastft   ``fastft.rl.token_logprobs(..., return_entropy=True)``: fastft.ops.linear_selective_log_softmax, token
           chunks, both outputs differentiable (one forward GEMM; backward: one recompute GEMM + the gradients').
  old      the route TRL's patch took before: log-probs from the fused linear cross-entropy (gradients computed in
           forward) + the entropy from a second chunked no-grad pass of the head
           (``fastft.integrations.trl.linear_cross_entropy_with_metrics``). Its entropy has NO gradient, so its
           backward does less than the others' (the loss differentiates only the log-probs there).
  full     plain torch on the whole [N, V] logits: log_softmax + gather, entropy -sum p log p, autograd.

Loss = sum(logp * a) + 0.01 * sum(entropy), with a fixed random a. Peak memory: bytes of the tensors the step
creates (``LiveBytes``, a dispatch-mode counter; the inputs and weights are not counted). CPU figures: ratios
measured in one run, not a GPU claim.

    python -m benchmarks.bench_token_entropy [--tokens 512] [--hidden 256] [--vocab 32000] [--rounds 5] [--out FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.gpu_static.memory_plan import LiveBytes
from benchmarks.harness import emit_text_report, interleave, loss_time_memory_table
from fastft import rl
from fastft.integrations.trl import linear_cross_entropy_with_metrics

ENTROPY_COEF = 0.01


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    a = torch.randn(args.tokens, generator=g)

    def fastft_route():
        logp, entropy = rl.token_logprobs(hidden, weight, targets, return_entropy=True)
        return logp, entropy

    def old_route():
        nll, metrics = linear_cross_entropy_with_metrics(hidden, weight, targets, reduction="none")
        return -nll, metrics.entropy

    def full_logits():
        logp_all = torch.log_softmax(hidden @ weight.T, -1)
        p = logp_all.exp()
        return logp_all.gather(-1, targets[:, None])[:, 0], -(p * logp_all).sum(-1)

    providers = {"full logits (log_softmax + gather + entropy on [N, V])": full_logits,
                 "old route (fused CE + no-grad metrics pass; entropy without gradient)": old_route,
                 "fastft token_logprobs(return_entropy=True)": fastft_route}

    def step(name):
        hidden.grad = weight.grad = None
        logp, entropy = providers[name]()
        loss = (logp * a).sum() + ENTROPY_COEF * entropy.sum()
        loss.backward()
        return loss.detach()

    losses = {name: step(name) for name in providers}  # also the warm-up
    grads = {}
    for name in providers:
        step(name)
        grads[name] = (hidden.grad.clone(), weight.grad.clone())
    times = interleave({name: (lambda r, name=name: step(name)) for name in providers}, args.rounds,
                       warmup_rounds=0, alternate=True)
    peaks = {}
    for name in providers:
        hidden.grad = weight.grad = None
        with LiveBytes() as tracker:
            step(name)
        peaks[name] = tracker.peak
    full, old, ours = providers
    grad_err = max((x - y).abs().max().item() for x, y in zip(grads[ours], grads[full]))
    lines = [f"log-probs + entropy, fwd+bwd (loss = sum(logp * a) + {ENTROPY_COEF} sum(entropy)), N={args.tokens} "
             f"H={args.hidden} V={args.vocab} fp32, CPU ({torch.get_num_threads()} threads), {args.rounds} "
             "interleaved rounds", "", *loss_time_memory_table(losses, times, peaks, full)]
    lines += ["", f"|fastft - full| loss = {abs(losses[ours] - losses[full]).item():.2e}, max |grad difference| "
                  f"(hidden, weight) = {grad_err:.2e}; the old route's loss differs by the entropy's gradient only "
                  f"(|old - full| loss = {abs(losses[old] - losses[full]).item():.2e}: same value, no entropy gradient)"]
    return emit_text_report(lines, args.out)


if __name__ == "__main__":
    main()
