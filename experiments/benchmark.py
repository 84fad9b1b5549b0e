r"""Training and inference speed of mnres models, optionally against PyTorch and Keras peers.

  python -m experiments.benchmark --models=mobilenet_v2 --alpha=1.0 --image_sizes=128 \
      --batch_sizes=64 --peers --allocator=both --json=benchmark.json

For every model x image size x batch size it measures compile time (the first training step),
steady-state training images/s (median of `--repeats` runs of `--steps` steps after warm-up),
evaluation images/s, batch-1 latency (median and p90), peak host memory, and the analytic
multiply-adds per image. mnres runs once per `--depthwise` formulation; with `--peers` the same
architecture and workload run in PyTorch (eager, channels_last) and Keras on TensorFlow, where
installed (`pip install 'mnres[bench]'`). Every run is its own subprocess, one after the other,
with its threads pinned to the cores; the table ends with the ratios mnres / peer.

Every framework runs under the same process-level allocator settings (`--allocator`): glibc's
default; freed memory kept (`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`
in the worker's environment, the settings of `mnres.host_memory.keep_freed_memory()`, which
XLA's steps need to stop page-faulting); or huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`:
glibc's default, its memory marked for transparent huge pages). Ratios compare runs of the same
mode only; `both` runs every configuration in the first two modes, `all` in the three, and each
prints what a mode changes against the default per framework, speed and peak memory.

Timings are only worth something on an otherwise idle machine: each row records how many cores
other processes kept busy just before it started and while it ran, and the table warns when
either was > 0.25.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app, flags

from experiments import _cli
from experiments.benchmark_tables import format_table, warning_lines
from experiments.peers import workload
from mnres import models
from mnres.models import params as params_lib

_MODELS = flags.DEFINE_list("models", ["mobilenet_v2"], f"Any of {', '.join(models.MODELS)}.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "Width multiplier (the seed network 'paper' is 1.0).")
_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["128"], "Image sides in pixels.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["64"], "Training and evaluation batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after the first (compiling) one.")
_LATENCY_CALLS = flags.DEFINE_integer("latency_calls", 50, "Timed batch-1 predictions.")
_DEPTHWISE = flags.DEFINE_list(
    "depthwise",
    ["shifted", "grouped"],
    "mnres conv formulations (conv_formulation) to run: auto/grouped/shifted.",
)
_PARTS = flags.DEFINE_list(
    "parts", ["train", "eval", "latency"], "What to measure; batch-1 latency only once per size."
)
_PEERS = flags.DEFINE_bool("peers", False, "Also run PyTorch and Keras-TensorFlow, if installed.")
_THREADS = flags.DEFINE_integer("threads", 0, "Threads (and cores) per run; 0: every core.")
_AUGMENT = flags.DEFINE_bool("augment", False, "mnres: keep the training augmentation in-step.")
_ALLOCATOR = flags.DEFINE_enum(
    "allocator",
    "both",
    ["default", "kept", "huge_pages", "both", "all"],
    "glibc malloc settings of every framework's process: 'default', 'kept' (freed memory kept "
    "for reuse, as mnres.host_memory.keep_freed_memory() sets it), 'huge_pages' (malloc asks for "
    "transparent huge pages), 'both' (default and kept) or 'all', one after the other.",
)
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory",
    None,
    "Older spelling: --keep_freed_memory is --allocator=kept, --nokeep_freed_memory "
    "--allocator=default; both now apply to every framework.",
)
_OVERRIDES = flags.DEFINE_string(
    "model_overrides", "{}", 'mnres only, JSON create_model fields, e.g. {"num_blocks": 2}.'
)
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds before a run is abandoned.")
_JSON = flags.DEFINE_string("json", None, "Write every result here as JSON.")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python",
    None,
    "The interpreter that runs the PyTorch and Keras workers (default: this one): e.g. a Python "
    "3.11 venv with 'mnres[bench]' where the registry's PyTorch for this Python is a GPU build.",
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = {
    "mnres": "experiments.peers.mnres_worker",
    "pytorch": "experiments.peers.torch_worker",
    "keras": "experiments.peers.keras_worker",
}
PEER_PACKAGES = {"pytorch": ("torch",), "keras": ("keras", "tensorflow")}
ALLOCATOR_MODES = {
    "default": ["default"],
    "kept": ["kept"],
    "huge_pages": ["huge_pages"],
    "both": ["default", "kept"],
    "all": list(workload.ALLOCATORS),
}
# Distributions whose versions the JSON records (the workers report their own, too).
VERSIONS = (
    "mnres", "jax", "jaxlib", "flax", "optax", "numpy", "torch", "keras", "tensorflow",
    "tensorflow-cpu",
)  # fmt: skip
PEER_MODELS = ("mobilenet_v1", "mobilenet_v2")


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU time other processes used over `seconds` (/proc/stat)."""
    try:

        def sample():
            with open("/proc/stat") as f:
                # user nice system idle iowait irq softirq steal (guest time is in user).
                fields = [int(v) for v in f.readline().split()[1:9]]
            idle = fields[3] + fields[4]
            return sum(fields) - idle, sum(fields)

        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
        return (busy1 - busy0) / max(1, total1 - total0) * os.cpu_count()
    except OSError:
        return float("nan")  # not Linux


def _cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds every process has used, CPU-seconds of this process's waited-for children)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        busy = float("nan")  # not Linux
    return busy, children.ru_utime + children.ru_stime


def _pinned(threads: int):
    """A preexec_fn that pins a child to `threads` of this process's cores, if fewer."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads >= len(allowed):
        return None
    return lambda: os.sched_setaffinity(0, allowed[:threads])


def worker_environment(spec: dict, env=None) -> dict:
    """The environment of a worker: its allocator's malloc settings and its thread counts."""
    env = workload.allocator_environment(spec["allocator"], os.environ if env is None else env)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


# The interpreter of the peers' workers (main sets it from --peer_python); None: this one.
peer_python: str | None = None


def interpreter(framework: str) -> str:
    """The Python that runs `framework`'s worker: `peer_python` for the peers, else this one."""
    if framework != "mnres" and peer_python:
        return peer_python
    return sys.executable


def run_worker(framework: str, spec: dict, timeout: float) -> dict:
    """Runs one worker subprocess; returns its result, or {'error': ...} when it failed.

    The spec's allocator ('default' when it names none) is set in the worker's environment.
    """
    spec = workload.resolve({"allocator": "default", **spec})
    env = worker_environment(spec)
    busy = busy_cores()
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [interpreter(framework), "-m", WORKERS[framework], json.dumps(spec)],
            cwd=REPO,  # the workers are modules of this checkout, whichever Python runs them
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            preexec_fn=_pinned(spec["threads"]),
        )
    except subprocess.TimeoutExpired:
        return {"framework": framework, "spec": spec, "error": f"timed out after {timeout} s"}
    wall_s = time.perf_counter() - start
    cpu_after = _cpu_seconds()
    # Everything the machine did meanwhile, less the worker's own CPU time.
    others = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])
    load = {"busy_cores_before": busy, "busy_cores_during": max(0.0, others / wall_s)}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(workload.RESULT_PREFIX):
            result = json.loads(line[len(workload.RESULT_PREFIX) :])
            if result["allocator"] != spec["allocator"]:  # the worker checks it too
                error = f"ran under the {result['allocator']!r} allocator"
                return {"framework": framework, "spec": spec, "error": error}
            return {**result, **load, "wall_s": wall_s}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"framework": framework, "spec": spec, "error": f"exit {proc.returncode}: {tail}"}


def _available(framework: str) -> str | None:
    """None when the peer can run here, else why not."""
    python = interpreter(framework)
    if python == sys.executable:
        missing = [p for p in PEER_PACKAGES[framework] if importlib.util.find_spec(p) is None]
    else:
        check = (
            "import importlib.util as u, sys; "
            "print(*(m for m in sys.argv[1:] if not u.find_spec(m)))"
        )
        try:
            out = subprocess.run(
                [python, "-c", check, *PEER_PACKAGES[framework]],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            return f"--peer_python={python} cannot run: {e}"
        missing = out.split()
    return f"not installed: {', '.join(missing)}" if missing else None


def plan(
    models_: list[str],
    image_sizes: list[int],
    batch_sizes: list[int],
    depthwise: list[str],
    peers: bool,
    base: dict,
    allocators: tuple[str, ...] = ("default",),
) -> list[tuple[str, dict | tuple[dict, str]]]:
    """(framework, spec) for every run, (framework, (spec, why not)) for a skipped one.

    Per configuration, every framework runs in the first allocator mode, then every framework
    in the next: the runs a ratio compares are close in time. Batch-1 latency does not depend on
    the batch size: only the first batch size measures it.
    """
    runs = []
    for model in models_:
        for size in image_sizes:
            for i, batch in enumerate(batch_sizes):
                parts = [p for p in base["parts"] if p != "latency" or i == 0]
                if not parts:
                    continue
                for allocator in allocators:
                    spec = {**base, "model": model, "image_size": size, "batch_size": batch}
                    spec.update(parts=parts, allocator=allocator)
                    runs += [("mnres", {**spec, "depthwise": d}) for d in depthwise]
                    if not peers:
                        continue
                    for framework in ("pytorch", "keras"):
                        why = _available(framework)
                        if why is None and model not in PEER_MODELS:
                            why = f"no {framework} peer for {model}"
                        elif why is None and base.get("overrides"):
                            why = f"no {framework} peer for a {model} with --model_overrides"
                        runs.append((framework, spec if why is None else (spec, why)))
    return runs


def allocator_modes(allocator: str, allocator_given: bool, keep_freed_memory: bool | None):
    """The allocator modes to run, from --allocator and the older --[no]keep_freed_memory."""
    if keep_freed_memory is None:
        return ALLOCATOR_MODES[allocator]
    old = "kept" if keep_freed_memory else "default"
    if allocator_given and allocator != old:
        raise app.UsageError(
            f"--allocator={allocator} contradicts --{'' if keep_freed_memory else 'no'}"
            "keep_freed_memory; give --allocator only"
        )
    return [old]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_facts(threads: int) -> dict:
    """What the JSON records about the machine and the software beside the results."""
    versions = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    return {
        "cpu": _cpu_model(),
        "cores": workload.cores(),
        "threads": threads or workload.cores(),
        "libc": libc,
        "transparent_huge_pages": workload.transparent_huge_pages(),
        "versions": versions,
        "malloc": {
            mode: workload.malloc_settings(workload.allocator_environment(mode, {}))
            for mode in workload.ALLOCATORS
        },
    }


def main(argv):
    del argv
    global peer_python
    peer_python = _PEER_PYTHON.value
    allocators = allocator_modes(
        _ALLOCATOR.value, flags.FLAGS["allocator"].present, _KEEP_FREED_MEMORY.value
    )
    sizes = [int(s) for s in _IMAGE_SIZES.value]
    batches = [int(b) for b in _BATCH_SIZES.value]
    overrides = json.loads(_OVERRIDES.value)
    base = {
        "alpha": _ALPHA.value,
        "repeats": _REPEATS.value,
        "steps": _STEPS.value,
        "warmup": _WARMUP.value,
        "latency_calls": _LATENCY_CALLS.value,
        "threads": _THREADS.value,
        "augment": _AUGMENT.value,
        "overrides": overrides,
        "parts": _PARTS.value,
    }
    macs = {
        (name, size): params_lib.multiply_adds(
            models.create_model(name, alpha=_ALPHA.value, num_classes=2, **overrides),
            (1, size, size, 3),
        )
        for name in _MODELS.value
        for size in sizes
    }
    results = []
    for framework, spec in plan(
        _MODELS.value, sizes, batches, _DEPTHWISE.value, _PEERS.value, base, tuple(allocators)
    ):
        if isinstance(spec, tuple):
            spec, why = spec
            result = {"framework": framework, "spec": workload.resolve(spec), "error": why}
        else:
            print(f"running {framework} {json.dumps(spec)}", file=sys.stderr, flush=True)
            result = run_worker(framework, spec, _TIMEOUT.value)
        result["mmacs_per_image"] = macs[(spec["model"], spec["image_size"])] / 1e6
        results.append(result)
    print(format_table(results))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            report = {
                **environment_facts(_THREADS.value),
                "date": time.strftime("%Y-%m-%d"),
                "allocators": allocators,
                "warnings": warning_lines(results),
                "results": results,
            }
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
