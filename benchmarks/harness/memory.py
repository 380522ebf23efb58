"""Peak memory of a provider's steps. The process probe (VmRSS / VmHWM and its reset) is the runtime's own
(fastft.runtime.memory, what the trainer records): one implementation. What is here is the benchmark's part:
glibc's heap handed back and pinned so the baseline between steps is honest, a polling fallback, and the CUDA
allocator's peak."""
from __future__ import annotations

import gc
import sys
import threading
import time

from fastft.runtime.memory import process_status_mb, reset_peak_rss


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _rss_mb() -> float:
    """Resident memory, after handing glibc's free heap pages back (malloc_trim) so that memory
    freed earlier does not count as held."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    return process_status_mb("VmRSS")


def memory_now_mb(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    return _rss_mb()


def _pin_malloc() -> bool:
    # torch's CPU allocator does not cache; glibc does. After a big block is freed, glibc raises its
    # mmap threshold (up to 32 MB) and serves blocks under it from the heap, whose freed pages stay
    # resident: the RSS after warmup then already holds a step's temporaries, and the peak over it
    # reads ~0 (seen: torch.compile at N=1024, V=8192). So fix the threshold at 128 KB (mallopt
    # M_MMAP_THRESHOLD, which also ends the adaptation: big blocks are mmapped and unmapped on free);
    # _rss_mb hands free heap pages back before the baseline. Called after the timing: an mmap per
    # block adds page faults the timed steps should not pay.
    libc = _libc()
    M_MMAP_THRESHOLD = -3
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))


def cpu_peak(step, state, n: int) -> tuple[float, float, str]:
    """(baseline RSS MB, peak RSS growth MB over ``n`` steps, method). The baseline is the RSS
    between steps, warmed up. Counts the pages a step touches (its outputs and temporaries are all
    written)."""
    gc.collect()
    if not _pin_malloc():
        print("harness: could not pin glibc malloc; peak memory may read low", file=sys.stderr)
    base = _rss_mb()
    if reset_peak_rss():
        for _ in range(n):
            step(state)
        return base, process_status_mb("VmHWM") - base, "VmHWM"
    # Fallback (no clear_refs, e.g. some sandboxes): poll RSS from a thread every 0.5 ms. ATen ops
    # and the autograd engine release the GIL, so the poller runs during the step, but a peak shorter
    # than a poll can be missed: a lower bound.
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], process_status_mb("VmRSS"))
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        for _ in range(n):
            step(state)
    finally:
        done.set()
        thread.join()
    return base, peak[0] - base, "RSS sampler (lower bound)"


def cuda_peak(step, state, n: int) -> tuple[float, float, str]:
    import torch

    gc.collect()
    base = memory_now_mb("cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(n):
        step(state)
    torch.cuda.synchronize()
    return base, torch.cuda.max_memory_allocated() / 2**20 - base, "cuda max_memory_allocated"
