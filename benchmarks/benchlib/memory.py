"""Extra peak memory of a step: above what the process holds just before it.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU: the peak resident set (``VmHWM``), reset through ``/proc/self/clear_refs`` so that several
  points can be measured one after the other in one process. glibc keeps freed blocks of up to
  32 MiB in its heaps, and a later point would reuse them without raising the resident set, so
  ``malloc_trim`` first hands them back to the OS. (Lowering glibc's mmap threshold instead would
  make every mid-sized allocation a fresh mapping, page faults and all, and distort the timings.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakMemory:
    """``start()`` marks the baseline and resets the peak; ``extra()`` is the peak above it, in bytes."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")        # resets VmHWM to the current resident set
            self.base = _rss_bytes()

    def extra(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _hwm_bytes() - self.base
