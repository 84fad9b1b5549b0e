"""Host memory settings that make XLA's CPU steps fast: keep freed memory in the process.

XLA on CPU allocates the buffers of every step afresh, and glibc hands large blocks back to
the kernel when they are freed (``mmap``/``munmap``, heap trimming). The next step then faults
every page in again, zero-filled by the kernel, and a training step spends a large share of its
CPU time in the kernel. With one malloc arena, no ``mmap`` for large blocks and no trimming,
freed blocks are reused and the faults all but disappear. The measurements (faults per step,
speed-up, memory cost) are in docs/performance.md, "Keeping freed memory".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel.

    Call it at the start of the process, before JAX runs its first computation: XLA's threads
    pick their malloc arena when they start, and a thread already running keeps its own arena,
    whose large blocks are always ``mmap``-ed. The process then holds on to its peak memory
    until it exits. Linux with glibc only; elsewhere nothing is changed.

    Returns:
      True if the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = (
        (_M_ARENA_MAX, 1),  # one arena for all threads: the main heap, which can grow
        (_M_MMAP_MAX, 0),  # large blocks from the heap too, not from mmap (munmap on free)
        (_M_TRIM_THRESHOLD, -1),  # read as SIZE_MAX: never give the heap top back
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
