"""Allocation counting for the tests that claim a memory plan (one definition for every such test)."""
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) over every CPU allocation while fn runs (torch.profiler's
    memory events also see the C++ kernels' own buffers)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
