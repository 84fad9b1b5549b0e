"""The benchmark command: multiply-adds, the timing protocol, allocator modes, table, JSON."""

import json
import os
import subprocess
import sys

import pytest
from absl import app

from experiments import benchmark
from experiments.peers import workload
from mnres import host_memory, models
from mnres.models import params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MobileNetV2 alpha 1.0: the paper's "300 M" multiply-adds at 224 px (1000 classes) and the
# 97.8 M quoted with the reference speeds, at 128 px (2 classes).
MOBILENET_V2_224_MACS = 300_774_272
MOBILENET_V2_128_2_CLASSES_MACS = 97_796_608


def test_multiply_adds_match_the_papers():
    v2 = models.create_model("mobilenet_v2")
    assert params.multiply_adds(v2, (1, 224, 224, 3)) == MOBILENET_V2_224_MACS
    assert params.multiply_adds(v2, (1, 224, 224, 3)) == pytest.approx(300e6, rel=0.01)
    two = models.create_model("mobilenet_v2", num_classes=2)
    assert params.multiply_adds(two, (1, 128, 128, 3)) == MOBILENET_V2_128_2_CLASSES_MACS
    # MobileNetV1 1.0 at 224: 569 M in Howard et al. 2017, Table 1.
    assert params.multiply_adds(models.create_model("mobilenet_v1")) == pytest.approx(
        569e6, rel=0.01
    )


def test_multiply_adds_do_not_depend_on_the_depthwise_formulation():
    shifted = models.create_model("mobilenet_v2", alpha=0.35, conv_formulation="shifted")
    grouped = shifted.clone(conv_formulation="grouped")
    assert params.multiply_adds(shifted, (1, 64, 64, 3)) == params.multiply_adds(
        grouped, (1, 64, 64, 3)
    )


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


def test_plan_runs_every_framework_in_every_allocator_mode():
    base = workload.resolve({"parts": ["train", "latency"]})
    runs = benchmark.plan(
        ["mobilenet_v2"], [64], [8, 16], ["shifted"], True, base, ("default", "kept")
    )
    frameworks = [(f, (s[0] if isinstance(s, tuple) else s)) for f, s in runs]
    got = [(f, s["allocator"], s["batch_size"], s["parts"]) for f, s in frameworks]
    assert got == [
        (f, mode, batch, parts)
        for batch, parts in ((8, ["train", "latency"]), (16, ["train"]))
        for mode in ("default", "kept")
        for f in ("mnres", "pytorch", "keras")
    ]


def test_allocator_modes_and_the_older_flag():
    assert benchmark.allocator_modes("all", False, None) == ["default", "kept", "huge_pages"]
    assert benchmark.allocator_modes("both", False, None) == ["default", "kept"]
    assert benchmark.allocator_modes("kept", True, None) == ["kept"]
    assert benchmark.allocator_modes("both", False, False) == ["default"]
    assert benchmark.allocator_modes("kept", True, True) == ["kept"]
    with pytest.raises(app.UsageError, match="contradicts"):
        benchmark.allocator_modes("kept", True, False)


def test_every_framework_gets_the_same_malloc_environment():
    inherited = {
        "PATH": "/bin",
        "MALLOC_ARENA_MAX": "4",  # from the shell: must not leak into either mode
        "MALLOC_PERTURB_": "1",
        "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.cpu.hwcaps=-AVX2",
    }
    default = workload.allocator_environment("default", inherited)
    assert default == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}
    assert workload.allocator_of(default) == "default"
    kept = workload.allocator_environment("kept", inherited)
    assert {k: v for k, v in kept.items() if k.startswith("MALLOC_")} == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": "-1",
    }
    assert workload.allocator_of(kept) == "kept"
    assert workload.allocator_of(inherited) == "other"
    # The environment form of mnres.host_memory.keep_freed_memory(), the same in both modules.
    assert workload.KEPT_MALLOC == host_memory.ENVIRONMENT
    for framework in ("mnres", "pytorch", "keras"):
        spec = workload.resolve({"allocator": "kept", "threads": 2})
        env = benchmark.worker_environment(spec, inherited)
        assert workload.allocator_of(env) == "kept", framework
        assert env["OMP_NUM_THREADS"] == "2"
    huge = workload.allocator_environment("huge_pages", inherited)
    assert huge["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX2:glibc.malloc.hugetlb=1"
    assert not any(k.startswith("MALLOC_") for k in huge)
    assert workload.allocator_of(huge) == "huge_pages"
    assert workload.allocator_of({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}) == "other"
    with pytest.raises(ValueError, match="allocator"):
        workload.allocator_environment("jemalloc", {})


def test_the_kernels_huge_page_mode_is_read_from_its_bracketed_word(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(workload, "THP_SETTING", str(setting))
    assert workload.transparent_huge_pages() == "madvise"
    monkeypatch.setattr(workload, "THP_SETTING", str(tmp_path / "absent"))
    assert workload.transparent_huge_pages() is None


def test_a_worker_refuses_to_run_under_another_allocator(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["worker", json.dumps({"allocator": "kept"})])
    for name in list(os.environ):
        if name.startswith("MALLOC_"):
            monkeypatch.delenv(name)
    built = []
    with pytest.raises(SystemExit, match="asks for the 'kept' allocator"):
        workload.run_worker(built.append)
    assert not built
    for name, value in workload.KEPT_MALLOC.items():
        monkeypatch.setenv(name, value)
    steps = (lambda: None, lambda: None, lambda: None)
    monkeypatch.setattr(
        sys, "argv", ["worker", json.dumps(dict(allocator="kept", parts=["latency"]))]
    )
    workload.run_worker(lambda spec: ({"framework": "none"}, steps))
    result = json.loads(capsys.readouterr().out.removeprefix(workload.RESULT_PREFIX))
    assert result["allocator"] == "kept" and result["malloc_settings"] == workload.KEPT_MALLOC
    assert result["cores_pinned"] == workload.cores()


def test_the_mnres_worker_leaves_the_allocator_alone(monkeypatch):
    from experiments.peers import mnres_worker

    def forbidden():
        raise AssertionError("the mnres worker must not change its own allocator")

    monkeypatch.setattr(host_memory, "keep_freed_memory", forbidden)
    spec = workload.resolve(
        dict(model="mobilenet_v1", alpha=0.25, image_size=32, batch_size=2, allocator="default")
    )
    spec["overrides"] = {"num_blocks": 1}
    info, steps = mnres_worker.build(spec)
    assert info["framework"] == "mnres" and len(steps) == 3


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
    ]  # --allocator=both by default
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train img/s" in proc.stdout and "mnres/auto" in proc.stdout
    assert "kept / default: mnres/auto (mobilenet_v1, 32 px, batch 8): train " in proc.stdout
    report = json.loads(out.read_text())
    assert report["allocators"] == ["default", "kept"]
    assert report["versions"]["jax"] and report["cpu"] and report["threads"] >= 1
    assert report["malloc"] == {
        "default": {},
        "kept": host_memory.ENVIRONMENT,
        "huge_pages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    }
    assert "transparent_huge_pages" in report
    assert isinstance(report["warnings"], list)
    rows = report["results"]
    assert [(r["framework"], r["spec"]["allocator"]) for r in rows] == [
        (framework, mode)
        for mode in ("default", "kept")
        for framework in ("mnres", "pytorch", "keras")
    ]
    for ours, mode in ((rows[0], "default"), (rows[3], "kept")):
        assert ours["framework"] == "mnres" and ours["depthwise_resolved"] == "shifted"
        assert ours["allocator"] == mode  # what the worker found in its own environment
        assert ours["threads_used"] == {"xla_cpu": report["threads"]}
        for key in (
            "compile_s",
            "train_images_per_s",
            "eval_images_per_s",
            "latency_ms_median",
            "latency_ms_p90",
            "peak_rss_mb",
            "mmacs_per_image",
            "busy_cores_before",
            "busy_cores_during",
        ):
            assert ours[key] >= 0, key
        assert ours["train_images_per_s"] > 0 and ours["peak_rss_mb"] > 100
    assert all("error" in r for r in rows if r["framework"] != "mnres")


@pytest.mark.parametrize("allocator", ["default", "kept"])
def test_the_pytorch_peer_runs_under_the_allocator_asked_for(allocator):
    pytest.importorskip("torch", reason="needs PyTorch, from the [bench] extra")
    spec = dict(
        alpha=0.35, image_size=32, batch_size=4, repeats=1, steps=1, warmup=0, latency_calls=2
    )
    result = benchmark.run_worker("pytorch", {**spec, "allocator": allocator}, timeout=300)
    assert "error" not in result, result
    assert result["allocator"] == allocator and result["spec"]["allocator"] == allocator
    assert result["train_images_per_s"] > 0 and result["peak_rss_mb"] > 50
    assert result["threads_used"]["intra_op"] == result["spec"]["threads"]


def test_pytorch_peer_has_the_same_parameters_as_mnres():
    pytest.importorskip("torch", reason="needs PyTorch, from the [bench] extra")
    from experiments.peers import torch_worker

    for name, alpha in (("mobilenet_v2", 0.35), ("mobilenet_v2", 1.0), ("mobilenet_v1", 0.25)):
        net = torch_worker.MODELS[name](alpha, 2)
        ours = params.count_params(models.create_model(name, alpha=alpha, num_classes=2))
        assert sum(p.numel() for p in net.parameters()) == ours.params, (name, alpha)
        running = sum(b.numel() for n, b in net.named_buffers() if "running" in n)
        assert running == ours.batch_stats, (name, alpha)


@pytest.mark.slow
def test_predict_speed_prints_measured_rates(capsys):
    from experiments import predict_speed

    predict_speed.main(["--crops=12"])
    out = json.loads(capsys.readouterr().out)
    for key in ("predict_float_crops_per_s", "predict_int8_crops_per_s", "model_crops_per_s"):
        assert out[key] > 0, key
    assert 0 < out["sample_second_s"] and out["crops"] == 12


def test_peers_run_in_the_interpreter_peer_python_names(tmp_path, monkeypatch):
    other = tmp_path / "python"  # another interpreter, as a Python 3.11 venv would be
    other.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    other.chmod(0o755)
    monkeypatch.setattr(benchmark, "peer_python", str(other))  # what --peer_python sets
    assert benchmark.interpreter("pytorch") == str(other)
    assert benchmark.interpreter("mnres") == sys.executable  # mnres itself never moves
    monkeypatch.setitem(benchmark.PEER_PACKAGES, "pytorch", ("json", "no_such_module_here"))
    # Asked of that interpreter, not of this process.
    assert benchmark._available("pytorch") == "not installed: no_such_module_here"
    monkeypatch.setattr(benchmark, "peer_python", str(tmp_path / "missing"))
    assert "cannot run" in benchmark._available("pytorch")
