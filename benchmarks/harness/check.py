"""Output checks: every provider's (sampled) outputs against the reference provider's before anything is timed,
so a broken kernel cannot win."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .providers import Benchmark


def step_outputs(out) -> dict:
    import torch

    if out is None:
        return {}
    if isinstance(out, torch.Tensor):
        return {"out": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"out{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise TypeError(f"a step must return a tensor, or a dict/tuple of tensors; got {type(out).__name__}")


def sample_rows(t, max_elems: int = 1 << 22):
    """The tensor, or evenly spaced rows of it when it is big (a [8192, 128256] gradient is checked
    on ~32 full rows): enough to catch a broken kernel, cheap to keep and ship between processes."""
    import torch

    t = t.detach()
    if t.dim() >= 2 and t.numel() > max_elems:
        rows = t.reshape(-1, t.shape[-1])
        k = max(1, max_elems // rows.shape[1])
        idx = torch.linspace(0, rows.shape[0] - 1, k, device=t.device).round().long()
        t = rows[idx]
    return t.float().cpu()


def compare(outs: dict, ref: dict, tolerances: dict) -> tuple[bool, dict, str]:
    """Max abs difference per output; ok when each is within atol + rtol * max|ref| (NaN where
    the reference has none fails)."""
    import torch

    diffs, bad = {}, []
    for name, r in ref.items():
        o = outs.get(name)
        if o is None or tuple(o.shape) != tuple(r.shape):
            bad.append(f"{name}: shape {None if o is None else tuple(o.shape)} != reference {tuple(r.shape)}")
            diffs[name] = float("inf")
            continue
        d = (o - r).abs()
        d = torch.where(torch.isnan(o) & torch.isnan(r), torch.zeros_like(d), d)
        d = torch.nan_to_num(d, nan=float("inf"))
        diff = float(d.max()) if d.numel() else 0.0
        atol, rtol = tolerances.get(name, tolerances.get("*", (1e-5, 1e-4)))
        limit = atol + rtol * (float(r.abs().nan_to_num(0.0).max()) if r.numel() else 0.0)
        diffs[name] = diff
        if not diff <= limit:
            bad.append(f"{name}: max |diff| {diff:.3g} > tolerance {limit:.3g}")
    return not bad, diffs, "; ".join(bad)


def check_agreement(bench: Benchmark, names: Optional[list] = None) -> dict:
    """One step of each available provider (in-process, nothing timed), compared with the
    reference. Returns {provider: {output: max diff}}; raises AssertionError on any disagreement.
    For tests."""
    providers = {p.name: p for p in bench.providers}
    ref_provider = providers[bench.reference]
    ref = ref_provider.checked_outputs(ref_provider.setup())
    result, failures = {}, []
    for p in bench.providers:
        if (names is not None and p.name not in names) or p.name == bench.reference or not p.is_available()[0]:
            continue
        outs = p.checked_outputs(p.setup())
        ok, diffs, why = compare(outs, ref, bench.tolerances)
        result[p.name] = diffs
        if not ok:
            failures.append(f"{p.name}: {why}")
    assert not failures, "providers disagree with " + bench.reference + ": " + " | ".join(failures)
    return result
