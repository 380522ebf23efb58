"""Full-vocabulary KL(policy || reference) over [N, V] logits: fastft vs torch eager, torch.compile, Liger.

One step = forward + backward of the masked-mean KL w.r.t. the policy logits (a leaf that requires
grad; its .grad is read and reset after each step); the reference logits are frozen. Default shapes:
CPU fp32 N=4096, V=32000; CUDA bf16 N=8192, V=128256; 25% of the tokens masked out.
Providers: fastft-<backend>; torch-eager (log_softmax x2, exp, multiply, sum: the formula RLHF code
writes); torch-compile of that same function; Liger (CUDA): LigerJSD(beta=1), i.e. reverse KL
sum Q (log Q - log P) of the log-softmaxed policy Q and reference P, masked through its labels.
``--op linear`` benchmarks linear_full_kl from hidden states (N, H, V) against the eager two-logits
version and its torch.compile (peak extra memory is the figure there).
Byte count for GB/s (full_kl): both logits read once + the policy gradient written once.
"""
from __future__ import annotations

import sys

import torch

from benchmarks import harness

DEFAULTS = {  # (N, V, dtype)
    ("cpu", False): (4096, 32000, "float32"),
    ("cuda", False): (8192, 128256, "bfloat16"),
    ("cpu", True): (1024, 8192, "float32"),
    ("cuda", True): (2048, 32000, "bfloat16"),
}
HIDDEN = {False: 1024, True: 256}
FASTFT_BACKENDS = ("cpp", "triton", "cuda")


def add_arguments(p) -> None:
    g = p.add_argument_group("kl")
    g.add_argument("--op", choices=("full", "linear"), default="full", help="full_kl (default) or linear_full_kl")
    g.add_argument("--n", type=int, help="tokens; default 4096 on CPU, 8192 on CUDA (1024 / 2048 with --quick)")
    g.add_argument("--v", type=int, help="vocabulary; default 32000 on CPU, 128256 on CUDA")
    g.add_argument("--h", type=int, help="hidden size for --op linear; default 1024 (256 with --quick)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default fp32 CPU, bf16 CUDA")
    g.add_argument("--mask-frac", type=float, default=0.25, help="fraction of tokens masked out")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)


def config_from_args(args, device: str) -> dict:
    return make_config(device, quick=bool(args.quick), op=args.op, n=args.n, v=args.v, h=args.h, dtype=args.dtype,
                       mask_frac=args.mask_frac, temperature=args.temperature, seed=args.seed)


def make_config(device: str = "cpu", **overrides) -> dict:
    quick = bool(overrides.get("quick", False))
    n, v, dtype = DEFAULTS[(device, quick)]
    cfg = {"device": device, "quick": quick, "op": "full", "n": n, "v": v, "h": HIDDEN[quick], "dtype": dtype,
           "mask_frac": 0.25, "temperature": 1.0, "seed": 0}
    cfg.update({k: val for k, val in overrides.items() if val is not None})
    return cfg


# ------------------------------------------------------------------------------------------------
# Inputs and steps
# ------------------------------------------------------------------------------------------------


def _inputs(cfg: dict):
    device = torch.device(cfg["device"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    n, v, dtype = cfg["n"], cfg["v"], getattr(torch, cfg["dtype"])
    mask = torch.rand(n, device=device, generator=gen) >= cfg["mask_frac"]
    if cfg["op"] == "linear":
        h = cfg["h"]
        st = {
            "hp": (torch.randn(n, h, device=device, generator=gen) * 0.5).to(dtype).requires_grad_(True),
            "wp": (torch.randn(v, h, device=device, generator=gen) / h ** 0.5).to(dtype).requires_grad_(True),
            "hr": (torch.randn(n, h, device=device, generator=gen) * 0.5).to(dtype),
            "wr": (torch.randn(v, h, device=device, generator=gen) / h ** 0.5).to(dtype),
        }
    else:
        policy = torch.randn(n, v, device=device, generator=gen)
        ref = policy + 0.5 * torch.randn(n, v, device=device, generator=gen)  # a nearby reference, as in RLHF
        st = {"policy": policy.to(dtype).requires_grad_(True), "ref": ref.to(dtype)}
    st["mask"] = mask
    return st


def eager_full_kl(policy, ref, mask, temperature: float = 1.0):
    """What RLHF code writes: two log-softmaxes, exp, the weighted sum, a masked mean."""
    logp = torch.log_softmax(policy.float() / temperature, dim=-1)
    logr = torch.log_softmax(ref.float() / temperature, dim=-1)
    kl = (logp.exp() * (logp - logr)).sum(-1)
    m = mask.to(kl.dtype)
    return ((kl * m).sum() / m.sum().clamp(min=1)).to(policy.dtype)


def eager_linear_full_kl(hp, wp, hr, wr, mask, temperature: float = 1.0):
    return eager_full_kl(hp @ wp.t(), hr @ wr.t(), mask, temperature)


def _step_full(loss_fn):
    def step(st):
        p = st["policy"]
        p.grad = None
        loss = loss_fn(p, st["ref"], st["mask"])
        loss.backward()
        grad, p.grad = p.grad, None
        return {"loss": loss.detach(), "grad": grad}

    return step


def _step_linear(loss_fn):
    def step(st):
        st["hp"].grad = st["wp"].grad = None
        loss = loss_fn(st["hp"], st["wp"], st["hr"], st["wr"], st["mask"])
        loss.backward()
        out = {"loss": loss.detach(), "grad_hidden": st["hp"].grad, "grad_weight": st["wp"].grad}
        st["hp"].grad = st["wp"].grad = None
        return out

    return step


def _fastft_provider(cfg: dict, backend: str) -> harness.Provider:
    import fastft
    from fastft.ops import full_kl, linear_full_kl

    t = cfg["temperature"]
    if cfg["op"] == "linear":
        step = _step_linear(lambda hp, wp, hr, wr, m: linear_full_kl(hp, wp, hr, wr, mask=m, temperature=t))
    else:
        step = _step_full(lambda p, r, m: full_kl(p, r, mask=m, temperature=t))
    return harness.fastft_backend_provider(cfg["device"], backend, lambda: _inputs(cfg), step,
                                           lambda: fastft.backend.status(backend))


def _eager_fn(cfg: dict):
    t = cfg["temperature"]
    if cfg["op"] == "linear":
        return lambda hp, wp, hr, wr, m: eager_linear_full_kl(hp, wp, hr, wr, m, t)
    return lambda p, r, m: eager_full_kl(p, r, m, t)


def _stepper(cfg: dict):
    return _step_linear if cfg["op"] == "linear" else _step_full


def _compile_provider(cfg: dict) -> harness.Provider:
    return harness.torch_compile_provider(cfg, lambda: _inputs(cfg), lambda st: _eager_fn(cfg),
                                          lambda st: _stepper(cfg)(st["compiled"])(st))


def _liger_provider(cfg: dict) -> harness.Provider:
    if cfg["op"] != "full":
        return harness.unavailable("liger", "Liger-Kernel has no fused linear KL; full_kl only")
    t = cfg["temperature"]

    def setup(cls):
        st = _inputs(cfg)
        jsd = cls(beta=1.0)
        labels = torch.where(st["mask"], 0, -100)

        def fn(p, r, m):
            # As documented: log-probabilities in, Q = policy (the input that gets the gradient).
            return jsd(torch.log_softmax(p / t, dim=-1), torch.log_softmax(r / t, dim=-1), labels)

        st["fn"] = fn
        return st

    return harness.liger_provider(cfg["device"], "LigerJSD", setup, lambda st: _step_full(st["fn"])(st),
                                  note="beta=1: reverse KL")


def build(cfg: dict) -> harness.Benchmark:
    n, v, dtype = cfg["n"], cfg["v"], getattr(torch, cfg["dtype"])
    linear = cfg["op"] == "linear"
    providers = [_fastft_provider(cfg, b) for b in FASTFT_BACKENDS]
    providers += [
        harness.Provider("torch-eager", lambda: _inputs(cfg), _stepper(cfg)(_eager_fn(cfg))),
        _compile_provider(cfg),
        _liger_provider(cfg),
    ]
    low = harness.low_precision(dtype)
    # (atol, rtol of max|eager|): fp32 differs from eager by rounding only; bf16/fp16 outputs are rounded
    # to the dtype (the loss ~4 ulps, each gradient element ~8 ulps of the largest).
    if linear:
        tol = {"*": (0.0, 3e-2)} if low else {"loss": (1e-6, 1e-4), "*": (0.0, 1e-3)}
    else:
        tol = {"loss": (0.0, 2e-2), "grad": (0.0, 3e-2)} if low else {"loss": (1e-6, 1e-4), "grad": (0.0, 1e-4)}
    elem = dtype.itemsize
    what = f"linear_full_kl H={cfg['h']}" if linear else "full_kl"
    return harness.op_benchmark(
        "linear_full_kl" if linear else "full_kl", cfg, providers,
        description=(f"{what} {cfg['dtype']} N={n} V={v}, {cfg['mask_frac']:.0%} masked, T={cfg['temperature']}, "
                     "step = forward + backward"),
        bytes_per_step=None if linear else 3 * n * v * elem,
        flops_per_step=(2 * 2 * n * v * cfg["h"] + 2 * 2 * n * v * cfg["h"]) if linear else None,
        tolerances=tol,
        notes=[
            "full_kl GB/s counts both logits read once + the policy gradient written once (3*N*V*element size)."
            if not linear else
            "TFLOP/s counts the 2 forward logits GEMMs + the 2 gradient GEMMs over all N tokens (8*N*V*H).",
            "Outputs checked against torch-eager before timing (loss and gradients on evenly spaced rows).",
        ],
    )


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
