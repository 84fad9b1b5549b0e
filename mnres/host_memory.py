"""Host memory settings that make XLA's CPU steps fast: keep freed memory in the process.

XLA on CPU allocates the buffers of every step afresh, and glibc hands large blocks back to
the kernel when they are freed (``mmap``/``munmap``, heap trimming). The next step then faults
every page in again, zero-filled by the kernel, and a training step spends a large share of its
CPU time in the kernel. With one malloc arena, no ``mmap`` for large blocks and no trimming,
freed blocks are reused and the faults all but disappear, at the price of a process that keeps
its peak memory until it exits.

Two ways to get it, with the same effect:

- ``keep_freed_memory()`` as the program's first step, before JAX's first computation;
- the environment variables of ``ENVIRONMENT`` set before Python starts
  (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 python train.py``),
  which works whatever the program does first.

The measurements (faults per step, speed-up, memory cost) are in docs/performance.md, "Keeping
freed memory".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings

# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_SETTINGS = (
    (_M_ARENA_MAX, 1),  # one arena for all threads: the main heap, which can grow
    (_M_MMAP_MAX, 0),  # large blocks from the heap too, not from mmap (munmap on free)
    (_M_TRIM_THRESHOLD, -1),  # read as SIZE_MAX: never give the heap top back
)

# The same settings as glibc reads them from the environment when a process starts.
ENVIRONMENT = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "-1",
}


def _jax_backend_started() -> bool:
    """Whether this process has already started a JAX backend (and with it XLA's threads)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # another JAX version: cannot tell
        return False


def _mallopt():
    """glibc's mallopt, or None where the C library has none (musl, other systems)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel.

    Call it first, before JAX runs its first computation: XLA's threads pick their malloc arena
    when they start, and a thread already running keeps its own arena, whose large blocks are
    always ``mmap``-ed. Called later, it warns (``RuntimeWarning``) and still applies the
    settings, which then do not stop the page faults of XLA's steps: restart the program, or
    set the variables of ``ENVIRONMENT`` before Python starts. The process then holds on to its
    peak memory until it exits. Linux with glibc only; elsewhere nothing is changed.

    Returns:
      True if the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if _jax_backend_started():
        warnings.warn(
            "keep_freed_memory() called after JAX started its backend: XLA's threads keep "
            "the malloc arenas they have, so its steps keep page-faulting. Call it before "
            "JAX's first computation, or start Python with "
            + " ".join(f"{k}={v}" for k, v in ENVIRONMENT.items())
            + ".",
            RuntimeWarning,
            stacklevel=2,
        )
    return all(mallopt(option, value) == 1 for option, value in _SETTINGS)
