"""Peak memory of one call, on CUDA (the caching allocator's counters) or on the CPU (resident set sampled).

On the CPU the resident set size is read from /proc every half millisecond on a helper thread while the call
runs (torch releases the GIL in its kernels). For the resident set to follow live tensors, glibc is told to
serve every allocation of 64 KiB or more with its own mmap (M_MMAP_THRESHOLD, which also stops glibc from
raising that threshold after large frees) and to return free heap pages first (malloc_trim); otherwise memory
freed by an earlier call would be reused without showing up. The figure is the growth over the resident size
before the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _glibc():
    """glibc with every allocation >= 64 KiB mmapped (so freed tensors leave the resident set), or None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024):
            return None
    except (OSError, AttributeError):
        return None
    return libc


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn()`` and return (its result, peak bytes allocated during it above what was held before)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError("CPU peak memory needs /proc/self/statm (Linux)")
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    base = _rss_bytes()
    peak = base
    running = True

    def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        running = False
        sampler.join()
    peak = max(peak, _rss_bytes())
    return result, peak - base
