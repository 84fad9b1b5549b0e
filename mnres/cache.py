"""The mnres cache folder, and the persistent compilation cache of the command line.

`$MNRES_CACHE` when set, else `~/.cache/mnres`: ImageNet weights (`keras-weights/`) and, for
`python -m mnres`, JAX's compiled programs (`jax-compile/`), so that a second `predict` loads
them instead of compiling again. Programs of any compile time are kept (predict's are small).
`MNRES_COMPILE_CACHE=0` or `--no-compile-cache` turns it off; a cache folder set through JAX's
own `jax_compilation_cache_dir` is left as it is. The cache has a size cap, which makes JAX
take a file lock for each write: two processes can share it.
"""

from __future__ import annotations

import os

CACHE_ENV = "MNRES_CACHE"
COMPILE_CACHE_ENV = "MNRES_COMPILE_CACHE"
COMPILE_SUBDIR = "jax-compile"
COMPILE_CACHE_BYTES = 1 << 30  # evicted least recently used beyond this


def default_cache_dir() -> str:
    """`$MNRES_CACHE` when set, else `~/.cache/mnres` (read on every call)."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "mnres"))


def enable_compile_cache(enabled: bool = True) -> str | None:
    """Turns JAX's persistent compilation cache on in the cache folder; returns the folder.

    None, and nothing changed, when `enabled` is False, `MNRES_COMPILE_CACHE` is 0/off/false,
    JAX already has a cache folder, or the folder cannot be created (a read-only home: the
    command then compiles as it would without a cache, it does not fail). The folder itself is
    made by JAX when it first writes a program.
    """
    import jax

    off = os.environ.get(COMPILE_CACHE_ENV, "").strip().lower() in ("0", "off", "false", "no")
    if not enabled or off or jax.config.jax_compilation_cache_dir:
        return None
    folder = os.path.join(default_cache_dir(), COMPILE_SUBDIR)
    # JAX creates the folder at the first compile: a command refused before it writes nothing.
    existing = folder
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    return folder
