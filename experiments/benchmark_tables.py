"""The benchmark's tables (`python -m experiments.benchmark`): the fixed-width table it prints,
the markdown the docs print from its `--json` report, and the ratios, reference checks and
load warnings under both."""

from __future__ import annotations

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
