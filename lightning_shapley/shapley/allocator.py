"""Keeping glibc from returning memory to the OS between forward passes on the CPU.

Scoring runs thousands of forward passes whose temporaries are a few MiB each. glibc's
malloc serves those from fresh ``mmap`` regions or trims them off the top of the heap on
``free``, so every pass page-faults its memory in again: in ``benchmarks/estimators.py``
that doubled the time of a coalition evaluation (half of it spent in the kernel). Raising
the mmap and trim thresholds keeps freed memory in the process for reuse, as jemalloc or
tcmalloc would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap; glibc's own dynamic ceiling on 64-bit.
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of the heap is returned to the OS only beyond this.
TRIM_THRESHOLD = 256 * 2**20

_tuned = False


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process; True if they were set.

    Does nothing off Linux, with another C library, or when the user already chose the
    thresholds through ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``. The cost
    is that up to :data:`TRIM_THRESHOLD` bytes of freed memory stay with the process.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _tuned = bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _tuned
