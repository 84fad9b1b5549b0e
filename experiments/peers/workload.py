"""The timed workload every benchmark worker runs, whatever its framework.

A worker builds three callables for its framework -- one training step, one evaluation step
on a full batch, one batch-1 prediction -- each of which returns only when its result has
been computed, and hands them to `measure`. This module imports no framework, so a worker's
peak memory is its own framework's.

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
    "keep_freed_memory": True,  # mnres only: mnres.host_memory.keep_freed_memory(), as training
    "overrides": {},  # mnres only: more `create_model` fields (peers refuse a non-empty one)
    "parts": ["train", "eval", "latency"],  # what to measure
    "seed": 0,
}


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
    info, (train_step, eval_step, predict_one) = build(spec)
    result = {"spec": spec, **info, **measure(spec, train_step, eval_step, predict_one)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
