"""The process's memory, as the trainer records it in metrics.jsonl (and the op benchmarks measure it: they
import this probe rather than keep a second one).

CPU (Linux): the resident set (VmRSS) and its high-water mark (VmHWM) from /proc/self/status; writing "5" to
/proc/self/clear_refs resets the mark to the current RSS (Linux >= 4.0). The kernel updates the mark before it
unmaps pages, so even a temporary freed within a step is counted: exact, where a sampler thread sees only the
RSS at its polls (checked: a 524 MB temporary freed at once shows in VmHWM). CUDA: the caching allocator's
allocated bytes and their peak.
"""
from __future__ import annotations

import resource
from typing import Optional

import torch
from torch import nn


def process_status_mb(key: str) -> Optional[float]:
    """``key`` (e.g. "VmRSS", "VmHWM") of /proc/self/status in MiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM (also ru_maxrss) to the current RSS; False where the kernel does not allow it (no /proc,
    some sandboxes): the peak read then is the lifetime one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's RSS high-water mark (since the last ``reset_peak_rss``) in MiB."""
    return process_status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryMeter:
    """Peak memory of the training steps alone. CUDA: the caching allocator's peak. CPU (Linux): the
    process's peak RSS (VmHWM), reset when training starts and after each eval, so model loading,
    conversion and evaluation (generation) are not counted; elsewhere the lifetime peak (ru_maxrss).
    ``resident_mb``: memory held when training starts, with the weights paged in (a memory-mapped
    checkpoint is read lazily), so ``peak - resident_mb`` is what the steps cost."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resident_mb = 0.0
        self._carried = 0.0  # peak of the steps before the last reset

    def _current(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return process_status_mb("VmRSS") or 0.0

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        reset_peak_rss()  # False without /proc: the lifetime peak is all there is

    def start(self, model: nn.Module) -> None:
        with torch.no_grad():
            for p in model.parameters():  # one read per 4 KiB page maps every weight in
                local = p.to_local() if hasattr(p, "to_local") else p
                if local.numel() and local.is_contiguous():
                    local.detach().view(-1)[::1024].sum()
        self.resident_mb = self._current()
        self._reset()

    def pause(self) -> None:
        """Before an eval: keep the steps' peak so far."""
        self._carried = self.peak()

    def resume(self) -> None:
        self._reset()

    def peak(self) -> float:
        if self.device.type == "cuda":
            now = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            now = peak_rss_mb()
        return max(now, self._carried)
