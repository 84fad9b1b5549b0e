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

# The peers' speeds quoted as the reference to beat, on a 2-core CPU (MobileNetV2 alpha 1.0,
# 2 classes): training at 128 px and batch 64, batch-1 latency at 128 px, in processes with
# glibc's default allocator (only rows of that mode are checked against them). A peer more than
# 15% off them means the machine or the peer's setup differs, and no ratio against it can be
# trusted until that is explained.
REFERENCE = {
    ("pytorch", "mobilenet_v2", 1.0, 128): {"train_images_per_s": 64.0, "latency_ms_median": 5.0},
    ("keras", "mobilenet_v2", 1.0, 128): {"train_images_per_s": 27.0, "latency_ms_median": 10.2},
}
REFERENCE_BATCH_SIZE = 64
REFERENCE_TOLERANCE = 0.15
BUSY_CORES_WARNING = 0.25


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


def _label(result: dict) -> str:
    if result["framework"] == "mnres":
        return f"mnres/{result['spec']['depthwise']}"
    return result["framework"]


def _cell(result: dict, key: str, fmt: str) -> str:
    value = result.get(key)
    return "-" if value is None else format(value, fmt)


COLUMNS = (
    ("malloc", 10, None),
    ("run", 15, None),
    ("model", 14, None),
    ("px", 4, None),
    ("batch", 5, None),
    ("compile s", 9, ("compile_s", ".1f")),
    ("train img/s", 11, ("train_images_per_s", ".1f")),
    ("eval img/s", 10, ("eval_images_per_s", ".1f")),
    ("b1 med ms", 9, ("latency_ms_median", ".2f")),
    ("b1 p90 ms", 9, ("latency_ms_p90", ".2f")),
    ("peak MB", 7, ("peak_rss_mb", ".0f")),
    ("MMACs/img", 9, ("mmacs_per_image", ".1f")),
    ("busy", 4, ("busy_cores_before", ".1f")),
    ("during", 6, ("busy_cores_during", ".1f")),
)
FIXED_COLUMNS = 5  # malloc, run, model, px, batch


def format_table(results: list[dict]) -> str:
    """The results as a fixed-width table, then ratios, reference checks and warnings."""
    lines = [" ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)]
    for r in results:
        spec = r["spec"]
        fixed = [
            spec["allocator"],
            _label(r),
            spec["model"],
            spec["image_size"],
            spec["batch_size"],
        ]
        if "error" in r:
            lines.append(
                " ".join(f"{v!s:>{w}}" for v, (_, w, _) in zip(fixed, COLUMNS, strict=False))
                + f"  skipped: {r['error']}"
            )
            continue
        cells = [str(v) for v in fixed] + [_cell(r, *how) for _, _, how in COLUMNS[FIXED_COLUMNS:]]
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w, _) in zip(cells, COLUMNS, strict=True)))
    lines += (
        [""]
        + ratio_lines(results)
        + allocator_lines(results)
        + reference_lines(results)
        + warning_lines(results)
    )
    return "\n".join(lines)


_PEER_NAMES = {"pytorch": "PyTorch (eager, channels_last)", "keras": "Keras (TensorFlow)"}


def markdown(report: dict) -> str:
    """A `--json` report as the docs print it: the runs, their repeats, ratios per mode."""
    ok = [r for r in report["results"] if "error" not in r]
    name = {
        id(r): f"mnres, {r['spec']['depthwise']} depthwise"
        if r["framework"] == "mnres"
        else _PEER_NAMES.get(r["framework"], r["framework"])
        for r in ok
    }
    # A run that other processes disturbed says so in its row and in every ratio it enters.
    mark = {
        id(r): f" (under load: {_others(r):.1f} cores)" if _others(r) > BUSY_CORES_WARNING else ""
        for r in ok
    }
    lines = [
        "| allocator | run | Python | compile s | train img/s | eval img/s | "
        "batch-1 median / p90 ms | peak MB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in ok:
        lines.append(
            f"| {r['spec']['allocator']} | {name[id(r)]}{mark[id(r)]} | {r.get('python', '?')} | "
            f"{r['compile_s']:.1f} | {r['train_images_per_s']:.1f} | "
            f"{r['eval_images_per_s']:.1f} | {r['latency_ms_median']:.2f} / "
            f"{r['latency_ms_p90']:.2f} | {r['peak_rss_mb']:,.0f} |"
        )
    repeats = "; ".join(
        f"{r['spec']['allocator']} {name[id(r)].split(' (')[0].split(',')[0]} "
        f"{min(r['train_images_per_s_runs']):.1f}-{max(r['train_images_per_s_runs']):.1f}"
        for r in ok
    )
    lines += ["", f"Training images/s, range of the timed repeats: {repeats}.", ""]
    lines += [
        "mnres against each peer in the same mode; speed: > 1 means mnres is faster, peak "
        "memory: > 1 means mnres needs more:",
        "",
        "| allocator | mnres run | against | train | eval | batch-1 | peak memory |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for ours in (r for r in ok if r["framework"] == "mnres"):
        for peer in ok:
            same = (_key(peer), peer["spec"]["allocator"]) == (
                _key(ours),
                ours["spec"]["allocator"],
            )
            if peer["framework"] == "mnres" or not same:
                continue
            cells = [
                f"{ours[k] / peer[k]:.2f}x" for k in ("train_images_per_s", "eval_images_per_s")
            ] + [
                f"{peer['latency_ms_median'] / ours['latency_ms_median']:.2f}x",
                f"{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x",
            ]
            lines.append(
                f"| {ours['spec']['allocator']} | {ours['spec']['depthwise']} | "
                f"{name[id(peer)].split(' (')[0]}{mark[id(ours)] or mark[id(peer)]} | "
                + " | ".join(cells)
                + " |"
            )
    v, spec = report["versions"], ok[0]["spec"] if ok else {}
    peers = sorted({r.get("version", "") for r in ok if r["framework"] != "mnres"})
    busiest = max((_others(r) for r in ok), default=0.0)
    lines += [
        "",
        f"{report['cores']}-core {report['cpu']}, {report['threads']} threads per run, "
        f"{report['libc']}, transparent huge pages `{report['transparent_huge_pages']}`; "
        f"mnres {v.get('mnres')}, jax {v.get('jax')}, flax {v.get('flax')} on Python "
        f"{v.get('python')}; peers: {', '.join(peers) or 'none'}. {spec.get('model')} "
        f"alpha {spec.get('alpha')}, {spec.get('image_size')} px, batch {spec.get('batch_size')}"
        f"; at most {busiest:.1f} of a core busy beside any run"
        + (f" ({' '.join(report['warnings'])})" if report.get("warnings") else "")
        + (f"; {report['date']}." if report.get("date") else "."),
    ]
    return "\n".join(lines)


def _key(r: dict):
    s = r["spec"]
    return (s["model"], s["image_size"], s["batch_size"])


def _ratios(a: dict, b: dict) -> list[str]:
    """a against b: speeds (> 1: a is faster) and peak memory (> 1: a needs more)."""
    parts = []
    for key, name in (("train_images_per_s", "train"), ("eval_images_per_s", "eval")):
        if a.get(key) and b.get(key):
            parts.append(f"{name} {a[key] / b[key]:.2f}x")
    if a.get("latency_ms_median") and b.get("latency_ms_median"):
        parts.append(f"batch-1 {b['latency_ms_median'] / a['latency_ms_median']:.2f}x")
    if parts and a.get("peak_rss_mb") and b.get("peak_rss_mb"):
        parts.append(f"peak memory {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    return parts


def ratio_lines(results: list[dict]) -> list[str]:
    """mnres / peer for every mnres run and every peer run of the same configuration and mode."""
    ok = [r for r in results if "error" not in r]
    lines = []
    for ours in (r for r in ok if r["framework"] == "mnres"):
        mode = ours["spec"]["allocator"]
        for peer in ok:
            if peer["framework"] == "mnres" or (_key(peer), peer["spec"]["allocator"]) != (
                _key(ours),
                mode,
            ):
                continue
            parts = _ratios(ours, peer)
            if parts:
                model, size, batch = _key(ours)
                lines.append(
                    f"{mode}: {_label(ours)} / {peer['framework']} ({model}, {size} px, "
                    f"batch {batch}): "
                    + ", ".join(parts)
                    + "  (speed: > 1 means mnres is faster; memory: > 1 means mnres needs more)"
                )
    return lines


def allocator_lines(results: list[dict]) -> list[str]:
    """mode / default for every run that also ran on the default allocator: what a mode changes."""
    ok = [r for r in results if "error" not in r]
    default = {(_label(r), _key(r)): r for r in ok if r["spec"]["allocator"] == "default"}
    lines = []
    for run in (r for r in ok if r["spec"]["allocator"] != "default"):
        base = default.get((_label(run), _key(run)))
        parts = _ratios(run, base) if base else []
        if parts:
            model, size, batch = _key(run)
            lines.append(
                f"{run['spec']['allocator']} / default: {_label(run)} ({model}, {size} px, "
                f"batch {batch}): " + ", ".join(parts)
            )
    return lines


def reference_lines(results: list[dict]) -> list[str]:
    """Each peer figure that has a reference in `REFERENCE`, with its deviation from it."""
    lines = []
    for r in results:
        if "error" in r:
            continue
        s = r["spec"]
        if s["allocator"] != "default":
            continue
        reference = REFERENCE.get((r["framework"], s["model"], s["alpha"], s["image_size"]), {})
        for key, expected in reference.items():
            if r.get(key) is None:
                continue
            if key == "train_images_per_s" and s["batch_size"] != REFERENCE_BATCH_SIZE:
                continue
            off = r[key] / expected - 1
            flag = "ok" if abs(off) <= REFERENCE_TOLERANCE else "OFF: find out why first"
            lines.append(
                f"reference {r['framework']} {key}: {r[key]:.1f} measured, {expected} expected "
                f"({off:+.0%}) {flag}"
            )
    return lines


def _others(r: dict) -> float:
    """The most cores other processes kept busy before or during the run `r`."""
    return max(r.get("busy_cores_before", 0.0), r.get("busy_cores_during", 0.0))


def warning_lines(results: list[dict]) -> list[str]:
    ran = [r for r in results if "error" not in r]
    busy = [r for r in ran if _others(r) > BUSY_CORES_WARNING]
    if not busy:
        return []
    worst = max(_others(r) for r in busy)
    return [
        f"WARNING: other processes kept up to {worst:.1f} cores busy before or during "
        f"{len(busy)} of the {len(ran)} runs; these timings are not trustworthy "
        f"(multi-threaded PyTorch collapses worst)."
    ]


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
