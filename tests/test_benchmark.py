"""The benchmark command: analytic multiply-adds, the timing protocol, the table, the JSON."""

import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark
from experiments.peers import workload
from mnres import models, params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MobileNetV2 alpha 1.0: the paper's "300 M" multiply-adds at 224 px (1000 classes) and the
# 97.8 M quoted with the reference speeds, at 128 px (2 classes).
MOBILENET_V2_224_MACS = 300_774_272
MOBILENET_V2_128_2_CLASSES_MACS = 97_796_608


def test_multiply_adds_match_the_papers():
    v2 = models.create_model("mobilenet_v2")
    assert benchmark.multiply_adds(v2, 224) == MOBILENET_V2_224_MACS
    assert benchmark.multiply_adds(v2, 224) == pytest.approx(300e6, rel=0.01)
    two = models.create_model("mobilenet_v2", num_classes=2)
    assert benchmark.multiply_adds(two, 128) == MOBILENET_V2_128_2_CLASSES_MACS
    # MobileNetV1 1.0 at 224: 569 M in Howard et al. 2017, Table 1.
    assert benchmark.multiply_adds(models.create_model("mobilenet_v1"), 224) == pytest.approx(
        569e6, rel=0.01
    )


def test_multiply_adds_do_not_depend_on_the_depthwise_formulation():
    shifted = models.create_model("mobilenet_v2", alpha=0.35, conv_formulation="shifted")
    grouped = shifted.clone(conv_formulation="grouped")
    assert benchmark.multiply_adds(shifted, 64) == benchmark.multiply_adds(grouped, 64)


def test_measure_reports_medians_percentiles_and_memory():
    spec = workload.resolve(dict(batch_size=4, repeats=3, steps=2, warmup=1, latency_calls=11))
    calls = {"train": 0, "eval": 0, "one": 0}
    count = lambda name: lambda: calls.__setitem__(name, calls[name] + 1)
    result = workload.measure(spec, count("train"), count("eval"), count("one"))
    # First (compiling) call + warm-up + repeats x steps.
    assert calls == {"train": 1 + 1 + 3 * 2, "eval": 1 + 1 + 3 * 2, "one": 1 + 1 + 11}
    assert len(result["train_images_per_s_runs"]) == 3
    assert result["train_images_per_s"] > 0 and result["eval_images_per_s"] > 0
    assert result["latency_ms_p90"] >= result["latency_ms_median"] >= 0
    assert result["peak_rss_mb"] > 10


def test_measure_only_the_parts_asked_for():
    spec = workload.resolve(dict(parts=["latency"], latency_calls=3))
    result = workload.measure(spec, None, None, lambda: None)
    assert "latency_ms_median" in result and "train_images_per_s" not in result
    with pytest.raises(ValueError, match="parts"):
        workload.resolve(dict(parts=["training"]))


def _result(framework, images_per_s, latency_ms, **spec):
    spec = workload.resolve({"alpha": 1.0, **spec})
    if framework == "mnres":
        spec["depthwise"] = "shifted"
    return {
        "framework": framework,
        "spec": spec,
        "train_images_per_s": images_per_s,
        "latency_ms_median": latency_ms,
        "busy_cores_before": 0.0,
    }


def test_table_ratios_and_reference_check():
    results = [
        _result("mnres", 32.0, 4.0),
        _result("pytorch", 64.0, 5.0),
        _result("keras", 10.0, 10.2),  # far below the reference 27 images/s
        {"framework": "keras", "spec": workload.resolve({"image_size": 224}), "error": "no TF"},
    ]
    table = benchmark.format_table(results)
    assert "mnres/shifted / pytorch (mobilenet_v2, 128 px, batch 64): train 0.50x" in table
    assert "batch-1 1.25x" in table
    assert "reference pytorch train_images_per_s: 64.0 measured, 64.0 expected (+0%) ok" in table
    assert "reference keras train_images_per_s: 10.0 measured, 27.0 expected (-63%) OFF" in table
    assert "skipped: no TF" in table
    assert "WARNING" not in table
    results[1]["busy_cores_before"] = 1.5
    assert "WARNING: other processes kept up to 1.5 cores busy" in benchmark.format_table(results)


def test_benchmark_command_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "--models=mobilenet_v1",
        "--alpha=0.25",
        '--model_overrides={"num_blocks": 1}',
        "--image_sizes=32",
        "--batch_sizes=8",
        "--repeats=2",
        "--steps=1",
        "--warmup=0",
        "--latency_calls=3",
        "--depthwise=auto",
        "--peers",  # skipped: no peer builds a model with overrides
        f"--json={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train img/s" in proc.stdout and "mnres/auto" in proc.stdout
    report = json.loads(out.read_text())
    ours, *peers = report["results"]
    assert ours["framework"] == "mnres" and ours["depthwise_resolved"] == "shifted"
    for key in (
        "compile_s",
        "train_images_per_s",
        "eval_images_per_s",
        "latency_ms_median",
        "latency_ms_p90",
        "peak_rss_mb",
        "mmacs_per_image",
        "busy_cores_before",
    ):
        assert ours[key] >= 0, key
    assert ours["train_images_per_s"] > 0 and ours["peak_rss_mb"] > 100
    assert [p["framework"] for p in peers] == ["pytorch", "keras"]
    assert all("error" in p for p in peers)


def test_pytorch_peer_has_the_same_parameters_as_mnres():
    pytest.importorskip("torch", reason="needs PyTorch, from the [bench] extra")
    from experiments.peers import torch_worker

    for name, alpha in (("mobilenet_v2", 0.35), ("mobilenet_v2", 1.0), ("mobilenet_v1", 0.25)):
        net = torch_worker.MODELS[name](alpha, 2)
        ours = params.count_params(models.create_model(name, alpha=alpha, num_classes=2))
        assert sum(p.numel() for p in net.parameters()) == ours.params, (name, alpha)
        running = sum(b.numel() for n, b in net.named_buffers() if "running" in n)
        assert running == ours.batch_stats, (name, alpha)
