"""The timed workload every benchmark worker runs, whatever its framework.

A worker builds three callables for its framework -- one training step, one evaluation step
on a full batch, one batch-1 prediction -- each of which returns only when its result has
been computed, and hands them to `measure`. This module imports no framework, so a worker's
peak memory is its own framework's.

Process-level settings are the same for every framework: the benchmark starts each worker
under glibc's default allocator, with freed memory kept (`KEPT_MALLOC`, the environment form
of `mnres.host_memory.keep_freed_memory()`) or with malloc asking for transparent huge pages
(`HUGE_PAGES_MALLOC`); no worker changes its allocator itself, and each reports the settings it
ran under.

Protocol: `python -m experiments.peers.<worker> '<spec as JSON>'` prints one line
`RESULT <json>` on stdout; the benchmark reads it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

RESULT_PREFIX = "RESULT "

# Fields of a spec (dict) and their defaults.
DEFAULT_SPEC = {
    "model": "mobilenet_v2",
    "alpha": 1.0,
    "num_classes": 2,
    "image_size": 128,
    "batch_size": 64,
    "repeats": 5,  # timed repeats; the median is reported
    "steps": 10,  # steps per timed repeat
    "warmup": 3,  # untimed steps after the first (compiling) one
    "latency_calls": 50,  # batch-1 predictions timed one by one
    "threads": 0,  # 0: one per core available to this process
    "depthwise": "auto",  # mnres only: its conv_formulation (auto/grouped/shifted)
    "augment": False,  # mnres only: the training augmentation inside the step
    # "default" / "kept": the glibc malloc settings the worker must run under, set in its
    # environment before it starts (`allocator_environment`); None: whatever it was started with.
    "allocator": None,
    "overrides": {},  # mnres only: more `create_model` fields (peers refuse a non-empty one)
    "parts": ["train", "eval", "latency"],  # what to measure
    "seed": 0,
}


# mnres.host_memory.ENVIRONMENT, repeated here so that no worker imports mnres to read it.
KEPT_MALLOC = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "-1",
}
_TUNABLES = "GLIBC_TUNABLES"
# glibc >= 2.35: malloc marks the memory it maps for transparent huge pages (madvise), so a
# buffer faults in 2 MiB at a time instead of 4 KiB; a no-op where the kernel's THP mode is
# 'never' (`transparent_huge_pages()` says which).
HUGE_PAGES_MALLOC = {_TUNABLES: "glibc.malloc.hugetlb=1"}
# The malloc settings of each allocator mode, as set in a worker's environment.
MALLOC_SETTINGS = {"default": {}, "kept": KEPT_MALLOC, "huge_pages": HUGE_PAGES_MALLOC}
ALLOCATORS = tuple(MALLOC_SETTINGS)
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _without_malloc_settings(env) -> dict:
    """`env` without glibc's malloc variables: MALLOC_* and glibc.malloc.* tunables."""
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    if _TUNABLES in env:
        kept = [t for t in env[_TUNABLES].split(":") if t and not t.startswith("glibc.malloc.")]
        if kept:
            env[_TUNABLES] = ":".join(kept)
        else:
            del env[_TUNABLES]
    return env


def allocator_environment(allocator: str, env) -> dict:
    """A copy of `env` for a process that must run under `allocator` (see ALLOCATORS)."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; use one of {', '.join(ALLOCATORS)}")
    env = _without_malloc_settings(env)
    for key, value in MALLOC_SETTINGS[allocator].items():
        if key == _TUNABLES:  # beside the other (non-malloc) tunables, if any
            value = ":".join(t for t in (env.get(key, ""), value) if t)
        env[key] = value
    return env


def malloc_settings(env=None) -> dict:
    """The glibc malloc variables of `env` (this process's environment by default)."""
    env = os.environ if env is None else env
    settings = {k: v for k, v in env.items() if k.startswith("MALLOC_")}
    tunables = [t for t in env.get(_TUNABLES, "").split(":") if t.startswith("glibc.malloc.")]
    if tunables:
        settings[_TUNABLES] = ":".join(tunables)
    return settings


def allocator_of(env=None) -> str:
    """'default', 'kept', 'huge_pages', or 'other' (other malloc settings) for `env`."""
    settings = malloc_settings(env)
    for name, wanted in MALLOC_SETTINGS.items():
        if settings == wanted:
            return name
    return "other"


def transparent_huge_pages() -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), None where it does not say."""
    try:
        with open(THP_SETTING) as f:
            text = f.read()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def cores() -> int:
    return len(os.sched_getaffinity(0))


def resolve(spec: dict) -> dict:
    unknown = set(spec) - set(DEFAULT_SPEC)
    if unknown:
        raise ValueError(f"unknown spec fields {sorted(unknown)}")
    spec = {**DEFAULT_SPEC, **spec}
    spec["threads"] = spec["threads"] or cores()
    unknown = set(spec["parts"]) - {"train", "eval", "latency"}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; use train, eval, latency")
    return spec


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _percentile(values, q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(
    spec: dict,
    train_step: Callable[[], object],
    eval_step: Callable[[], object],
    predict_one: Callable[[], object],
) -> dict:
    """Times the workload of `spec`; every callable must block until its work is done.

    Returns:
      For the `parts` of the spec: compile_s (the first training step, compilation or tracing
      included; eval_compile_s, latency_compile_s likewise), train_images_per_s and
      eval_images_per_s (medians over `repeats` runs of `steps` steps after `warmup` steps,
      every run in *_runs), latency_ms_median and latency_ms_p90 of `latency_calls` batch-1
      predictions; always peak_rss_mb and the 1-minute load average before and after (a
      busy machine makes every figure meaningless).
    """
    batch, steps, repeats = spec["batch_size"], spec["steps"], spec["repeats"]
    result = {"load_average_before": os.getloadavg()[0]}

    def throughput(step):
        first = _timed(step)  # compilation / tracing included
        for _ in range(spec["warmup"]):
            step()
        runs = [
            batch * steps / _timed(lambda: [step() for _ in range(steps)]) for _ in range(repeats)
        ]
        return first, runs

    if "train" in spec["parts"]:
        result["compile_s"], runs = throughput(train_step)
        result["train_images_per_s"] = statistics.median(runs)
        result["train_images_per_s_runs"] = runs
    if "eval" in spec["parts"]:
        result["eval_compile_s"], runs = throughput(eval_step)
        result["eval_images_per_s"] = statistics.median(runs)
        result["eval_images_per_s_runs"] = runs
    if "latency" in spec["parts"]:
        result["latency_compile_s"] = _timed(predict_one)
        for _ in range(spec["warmup"]):
            predict_one()
        latency = [1000 * _timed(predict_one) for _ in range(spec["latency_calls"])]
        result["latency_ms_median"] = statistics.median(latency)
        result["latency_ms_p90"] = _percentile(latency, 0.9)
    result["load_average_after"] = os.getloadavg()[0]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_worker(build: Callable[[dict], tuple[dict, tuple]]) -> None:
    """The `__main__` of a worker: spec from argv -> `build(spec)` -> timings -> stdout.

    `build` returns (facts about the run, e.g. versions; (train_step, eval_step, predict_one)).
    """
    spec = resolve(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
    allocator = allocator_of()
    if spec["allocator"] not in (None, allocator):
        modes = ", ".join(
            f"{name!r} is " + (" ".join(f"{k}={v}" for k, v in wanted.items()) or "none of them")
            for name, wanted in MALLOC_SETTINGS.items()
        )
        sys.exit(
            f"the spec asks for the {spec['allocator']!r} allocator, but this process runs under "
            f"{allocator!r} ({malloc_settings() or 'no malloc variables'}); in the environment, "
            f"{modes}"
        )
    process = {
        "allocator": allocator,
        "malloc_settings": malloc_settings(),
        "transparent_huge_pages": transparent_huge_pages(),
        "cores_pinned": cores(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": sys.version.split()[0],  # a peer may run in another interpreter
    }
    info, (train_step, eval_step, predict_one) = build(spec)
    measured = measure(spec, train_step, eval_step, predict_one)
    result = {"spec": spec, **process, **info, **measured}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
