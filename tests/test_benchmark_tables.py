"""The benchmark's tables: ratios per allocator mode, reference checks, load warnings."""

from experiments import benchmark_tables
from experiments.peers import workload


def _result(framework, images_per_s, latency_ms, peak_mb=1000.0, allocator="default", **spec):
    spec = workload.resolve({"alpha": 1.0, "allocator": allocator, **spec})
    if framework == "mnres":
        spec["depthwise"] = "shifted"
    return {
        "framework": framework,
        "spec": spec,
        "train_images_per_s": images_per_s,
        "latency_ms_median": latency_ms,
        "peak_rss_mb": peak_mb,
        "busy_cores_before": 0.0,
        "busy_cores_during": 0.0,
    }


def test_table_ratios_and_reference_check():
    results = [
        _result("mnres", 32.0, 4.0, peak_mb=3000.0),
        _result("pytorch", 64.0, 5.0, peak_mb=2000.0),
        _result("keras", 10.0, 10.2),  # far below the reference 27 images/s
        {
            "framework": "keras",
            "spec": workload.resolve({"image_size": 224, "allocator": "default"}),
            "error": "no TF",
        },
    ]
    table = benchmark_tables.format_table(results)
    assert (
        "default: mnres/shifted / pytorch (mobilenet_v2, 128 px, batch 64): train 0.50x, "
        "batch-1 1.25x, peak memory 1.50x" in table
    )
    assert "reference pytorch train_images_per_s: 64.0 measured, 64.0 expected (+0%) ok" in table
    assert "reference keras train_images_per_s: 10.0 measured, 27.0 expected (-63%) OFF" in table
    assert "skipped: no TF" in table
    assert "WARNING" not in table
    results[1]["busy_cores_before"] = 1.5
    assert "WARNING: other processes kept up to 1.5 cores busy" in benchmark_tables.format_table(
        results
    )
    results[1]["busy_cores_before"] = 0.0
    results[2]["busy_cores_during"] = 0.8  # e.g. a training run started meanwhile
    assert "up to 0.8 cores busy before or during 1 of the 3 runs" in benchmark_tables.format_table(
        results
    )


def test_markdown_prints_each_run_and_marks_the_ones_under_load():
    def full(framework, train, latency, peak, python):
        r = _result(framework, train, latency, peak_mb=peak)
        r.update(compile_s=10.0, eval_images_per_s=2 * train, latency_ms_p90=latency + 1,
                 train_images_per_s_runs=[train - 1, train, train + 1], python=python,
                 version=f"{framework} 1.0")  # fmt: skip
        return r

    results = [full("mnres", 60.0, 4.0, 3000.0, "3.12.1"), full("pytorch", 50.0, 8.0, 2000.0,
                                                               "3.11.7")]  # fmt: skip
    report = {"results": results, "versions": {"mnres": "0.2.0", "jax": "0.12.0.1",
              "flax": "0.12.12", "python": "3.12.1"}, "cores": 2, "cpu": "Some CPU",
              "threads": 2, "libc": "glibc 2.36", "transparent_huge_pages": "madvise",
              "warnings": [], "date": "2026-12-05"}  # fmt: skip
    text = benchmark_tables.markdown(report)
    assert (
        "| default | mnres, shifted depthwise | 3.12.1 | 10.0 | 60.0 | 120.0 | 4.00 / 5.00 " in text
    )
    assert "| default | PyTorch (eager, channels_last) | 3.11.7 |" in text
    assert "| default | shifted | PyTorch | 1.20x | 1.20x | 2.00x | 1.50x |" in text
    assert "under load" not in text
    results[1]["busy_cores_during"] = 0.9
    text = benchmark_tables.markdown(report)
    assert "| default | shifted | PyTorch (under load: 0.9 cores) | 1.20x |" in text


def test_ratios_compare_runs_of_the_same_allocator_mode_only():
    results = [
        _result("mnres", 30.0, 6.0, peak_mb=4000.0, allocator="default"),
        _result("pytorch", 50.0, 6.0, peak_mb=2000.0, allocator="default"),
        _result("mnres", 75.0, 5.0, peak_mb=8000.0, allocator="kept"),
        _result("pytorch", 100.0, 4.0, peak_mb=2500.0, allocator="kept"),
    ]
    table = benchmark_tables.format_table(results)
    ratios = [line for line in table.splitlines() if " / pytorch " in line]
    assert ratios == [
        "default: mnres/shifted / pytorch (mobilenet_v2, 128 px, batch 64): train 0.60x, "
        "batch-1 1.00x, peak memory 2.00x  (speed: > 1 means mnres is faster; memory: > 1 means "
        "mnres needs more)",
        "kept: mnres/shifted / pytorch (mobilenet_v2, 128 px, batch 64): train 0.75x, "
        "batch-1 0.80x, peak memory 3.20x  (speed: > 1 means mnres is faster; memory: > 1 means "
        "mnres needs more)",
    ]
    assert (
        "kept / default: mnres/shifted (mobilenet_v2, 128 px, batch 64): train 2.50x, "
        "batch-1 1.20x, peak memory 2.00x" in table
    )
    assert "kept / default: pytorch (mobilenet_v2, 128 px, batch 64): train 2.00x" in table
    # The references are peers on glibc's default allocator: kept rows are not checked.
    assert [line for line in table.splitlines() if line.startswith("reference")] == [
        "reference pytorch train_images_per_s: 50.0 measured, 64.0 expected (-22%) OFF: find out "
        "why first",
        "reference pytorch latency_ms_median: 6.0 measured, 5.0 expected (+20%) OFF: find out "
        "why first",
    ]
    rows = table.splitlines()[1:5]
    assert [row.split()[:2] for row in rows] == [
        ["default", "mnres/shifted"],
        ["default", "pytorch"],
        ["kept", "mnres/shifted"],
        ["kept", "pytorch"],
    ]


def test_huge_pages_mode_is_compared_with_its_own_mode_and_against_the_default():
    results = [
        _result("mnres", 30.0, 6.0, peak_mb=3000.0, allocator="default"),
        _result("pytorch", 40.0, 6.0, peak_mb=2000.0, allocator="default"),
        _result("mnres", 60.0, 5.0, peak_mb=3000.0, allocator="huge_pages"),
        _result("pytorch", 50.0, 6.0, peak_mb=2000.0, allocator="huge_pages"),
    ]
    table = benchmark_tables.format_table(results)
    assert "huge_pages: mnres/shifted / pytorch (mobilenet_v2, 128 px, batch 64): train 1.20x" in (
        table
    )
    assert "huge_pages / default: mnres/shifted (mobilenet_v2, 128 px, batch 64): train 2.00x" in (
        table
    )
    assert [row.split()[0] for row in table.splitlines()[1:5]] == [
        "default", "default", "huge_pages", "huge_pages"
    ]  # fmt: skip
