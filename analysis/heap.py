"""Keeping freed memory in the process, for analyses that make many large short-lived arrays.

    keep_freed_memory() -> bool     (True where it took effect: glibc)

Attribution and the bandwidth tables make dozens of temporary arrays of one
value per event (24 MB each at 3 M events). glibc's malloc serves blocks that
large from fresh kernel mappings and returns them when freed, so every
temporary's pages are faulted in again, zeroed by the kernel: measured on the
2-core development machine, that is a third of the attribution's CPU time.
Raising the mmap threshold to its maximum (32 MiB) and not trimming the heap
keeps those pages for reuse. Called by the commands that analyse, once, before
the first large array; the memory held stays bounded by the largest arrays
alive at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20      # glibc's upper bound on 64-bit machines
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):    # not glibc (musl, macOS, Windows): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
