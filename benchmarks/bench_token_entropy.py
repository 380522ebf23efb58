"""Per-token log-probs AND entropy of a linear head, forward + backward (a policy term plus an entropy bonus),
two ways on the same inputs, interleaved in one process:

  fastft   ``fastft.rl.token_logprobs(..., return_entropy=True)``: fastft.ops.linear_selective_log_softmax, token
           chunks, both outputs differentiable (one forward GEMM; backward: one recompute GEMM + the gradients').
  full     plain torch on the whole [N, V] logits: log_softmax + gather, entropy -sum p log p, autograd.

``--softcap C``: both on the capped logits ``C * tanh(z / C)`` (Gemma-2/3's head).
Loss = sum(logp * a) + 0.01 * sum(entropy), with a fixed random a. Peak memory: bytes of the tensors the step
creates (``LiveBytes``, a dispatch-mode counter; the inputs and weights are not counted). CPU figures: ratios
measured in one run, not a GPU claim.

    python -m benchmarks.bench_token_entropy [--tokens 512] [--hidden 256] [--vocab 32000] [--softcap C]
                                             [--rounds 5] [--out FILE]
    python -m benchmarks.bench_token_entropy --accuracy     # max |error| vs fp64 per backend and dtype instead

``--accuracy``: logp, entropy and the gradients (hidden, weight, bias) of every CPU backend in fp32 and bf16 against
the fp64 truth (plain torch on the whole logits), beside torch's own error in that dtype, at N=257 H=64 V=2003 with a
tenth of the vocabulary masked by a -inf bias, a quarter of the targets ignored, temperature 0.8, random upstream
gradients on both outputs. (Run it with TRITON_INTERPRET=1 for the Triton backend.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.gpu_static.memory_plan import LiveBytes
from benchmarks.harness import emit_text_report, interleave, loss_time_memory_table
from fastft import rl

ENTROPY_COEF = 0.01


def _log_softmax_entropy(logits, temperature):
    logp = torch.log_softmax(logits / temperature, -1)
    p = logp.exp()
    return logp, -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def accuracy(out=None, softcap=None) -> str:
    from fastft import backend
    from fastft.ops import linear_selective_log_softmax

    g = torch.Generator().manual_seed(0)
    n, h, v, temperature = 257, 64, 2003, 0.8
    inputs = [torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
              / h ** 0.5, 0.3 * torch.randn(v, generator=g, dtype=torch.float64)]
    inputs[2][::10] = -float("inf")
    targets = torch.randint(0, v, (n,), generator=g)
    targets[targets % 10 == 0] += 1
    targets[::4] = -100
    upstream = torch.randn(2, n, generator=g, dtype=torch.float64)

    def torch_way(x, w, b, t):
        logits = torch.nn.functional.linear(x, w, b)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp, entropy = _log_softmax_entropy(logits, temperature)
        counted = t != -100
        picked = logp.gather(-1, torch.where(counted, t, 0)[:, None])[:, 0]
        return torch.where(counted, picked, 0.0), torch.where(counted, entropy, 0.0)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        logp, entropy = fn(*leaves, targets)
        ((logp * upstream[0].to(logp.dtype)).sum() + (entropy * upstream[1].to(entropy.dtype)).sum()).backward()
        return [logp.detach(), entropy.detach(), *(t.grad for t in leaves)]

    def fastft_way(name):
        def fn(x, w, b, t):
            with backend.use(name):
                return linear_selective_log_softmax(x, w, t, bias=b, temperature=temperature, softcap=softcap,
                                                    return_entropy=True)
        return fn

    truth = run(torch_way, torch.float64)
    cols = ("logp", "entropy", "grad hidden", "grad weight", "grad bias")
    capped = "" if softcap is None else f", softcap {softcap:g}"
    lines = [f"max |error| vs fp64, N={n} H={h} V={v}, T={temperature}{capped}, -inf bias on V/10, 1/4 targets ignored",
             "",
             "| computed by | dtype | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in [("torch (same dtype)", torch_way)] + [(f"fastft {b}", fastft_way(b))
                                                              for b in ("reference", "cpp", "triton")
                                                              if backend.status(b)[0]]:
            errs = [(a.double() - t).abs().max().item() for a, t in zip(run(fn, dtype), truth)]
            lines.append(f"| {name} | {str(dtype)[6:]} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    return emit_text_report(lines, out)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="errors vs fp64 per backend and dtype instead")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--softcap", type=float, default=None, help="cap the logits: C * tanh(z / C)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.accuracy:
        return accuracy(args.out, args.softcap)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    a = torch.randn(args.tokens, generator=g)

    softcap = args.softcap

    def fastft_route():
        logp, entropy = rl.token_logprobs(hidden, weight, targets, softcap=softcap, return_entropy=True)
        return logp, entropy

    def full_logits():
        logits = hidden @ weight.T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp_all = torch.log_softmax(logits, -1)
        p = logp_all.exp()
        return logp_all.gather(-1, targets[:, None])[:, 0], -(p * logp_all).sum(-1)

    providers = {"full logits (log_softmax + gather + entropy on [N, V])": full_logits,
                 "fastft token_logprobs(return_entropy=True)": fastft_route}

    def step(name):
        hidden.grad = weight.grad = None
        logp, entropy = providers[name]()
        loss = (logp * a).sum() + ENTROPY_COEF * entropy.sum()
        loss.backward()
        return loss.detach()

    def counted_peak(name):
        hidden.grad = weight.grad = None
        with LiveBytes() as tracker:
            step(name)
        return tracker.peak

    def grads_of(name):
        step(name)
        return hidden.grad.clone(), weight.grad.clone()

    losses = {name: step(name) for name in providers}  # also the warm-up
    grads = {name: grads_of(name) for name in providers}
    times = interleave({name: (lambda r, name=name: step(name)) for name in providers}, args.rounds,
                       warmup_rounds=0, alternate=True)
    peaks = {name: counted_peak(name) for name in providers}
    full, ours = providers
    grad_err = max((x - y).abs().max().item() for x, y in zip(grads[ours], grads[full]))
    capped = "" if softcap is None else f", softcap {softcap:g}"
    title = (f"log-probs + entropy, fwd+bwd (loss = sum(logp * a) + {ENTROPY_COEF} sum(entropy)), N={args.tokens} "
             f"H={args.hidden} V={args.vocab}{capped} fp32, CPU ({torch.get_num_threads()} threads), {args.rounds} "
             "interleaved rounds")
    agreement = (f"|fastft - full| loss = {abs(losses[ours] - losses[full]).item():.2e}, max |grad difference| "
                 f"(hidden, weight) = {grad_err:.2e}")
    return emit_text_report([title, "", *loss_time_memory_table(losses, times, peaks, full), "", agreement], args.out)


if __name__ == "__main__":
    main()
