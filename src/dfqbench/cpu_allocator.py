"""Keep freed CPU tensor memory in the process instead of handing it back to the kernel after every op.

glibc serves a large allocation (from 128 KiB, its threshold rising to at most 32 MiB) with a fresh mmap and
returns it with munmap when freed, so every large intermediate tensor of a CPU forward pays a page fault per 4 KiB
it touches. In these virtual machines that made `x.clone()` of 8 MiB cost 10x a copy into an existing tensor, and
an FP32 ResNet-20 forward 1.5x slower (results/bench/fakequant_cpu.md measures both settings). Raising the mmap
and trim thresholds makes glibc reuse freed heap memory; the price is a process that keeps its peak heap.
`DFQ_KEEP_FREED_MEMORY=0` leaves glibc's defaults; elsewhere than Linux/glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_THRESHOLD = 1 << 30
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap/trim thresholds to 1 GiB (once per process); True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DFQ_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        _applied = False
    return _applied
