"""End to end: `python -m experiments.malaria` on the smoke config (synthetic cells).

Runs in subprocesses where the device count or a hard kill matters; they share a persistent
XLA compilation cache so that repeated runs of one program compile once.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import smoke
from mnres import metrics, run_folder
from mnres.metrics import calibration
from mnres.training import checkpoint, optim
from mnres.training import loop as train

REPO = Path(__file__).resolve().parents[1]
SMOKE = "experiments/configs/smoke.py"
# The smoke config, shorter: 320 training cells, 5 steps of 64 per epoch, 2 epochs. Short on
# purpose: rounding differences of another reduction order (8 devices, 2 processes) stay at
# ~1e-7 until a ReLU gate over a flat background (or a BatchNorm variance near 0) flips, and
# from then on the runs drift apart at 1e-4 after some 10-20 steps.
SHORT = (
    "--config.data.synthetic_size=400",
    "--config.batch_size=64",
    "--config.num_epochs=2",
)
OUTPUTS = (
    "config.json",
    "manifest.json",
    "metrics.jsonl",
    "report.json",
    "report.md",
    "predictions_test.csv",
    "history.png",
    "confusion_matrix.png",
    "calibration.json",
    "test_outputs.npz",
    "reliability_uncalibrated.png",
    "reliability_calibrated.png",
    "roc.png",
)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def run_experiment(workdir, *flags, cache, devices=1, env=None, check=True):
    environ = {
        **{
            k: v for k, v in os.environ.items() if k not in ("MNRES_TEST_KILL_AT_STEP", "XLA_FLAGS")
        },
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        **(env or {}),
    }
    if devices > 1:
        environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [
        sys.executable, "-m", "experiments.malaria", f"--config={SMOKE}", f"--workdir={workdir}",
        "--config.progress_bar=False", *flags,
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def results(workdir):
    """The report's metrics and the history, timing fields aside."""
    report = json.loads((Path(workdir) / "report.json").read_text())
    history = [
        {k: v for k, v in row.items() if k not in train.TIMING_FIELDS} for row in report["history"]
    ]
    return {
        "history": history,
        **{k: report[k] for k in ("test", "validation", "test_patient", "training")},
    }


def assert_close(a, b, tol, path="result", field_tol=None):
    """Nested equality with floats compared to an absolute tolerance (`field_tol`: per key)."""
    field_tol = field_tol or {}
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close(a[k], b[k], field_tol.get(k, tol), f"{path}.{k}", field_tol)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, tol, f"{path}[{i}]", field_tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol, f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def without_run_fields(r):
    """Drops what legitimately differs between runs of one config (devices, wall time)."""
    r = json.loads(json.dumps(r))
    for k in ("devices", "processes", *train.TIMING_FIELDS):
        r["training"].pop(k, None)
    return r


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, compilation_cache):
    workdir = tmp_path_factory.mktemp("short") / "run"
    run_experiment(workdir, *SHORT, cache=compilation_cache)
    return workdir


def test_smoke_config_learns_and_writes_every_output(tmp_path, compilation_cache):
    workdir = tmp_path / "smoke"
    run_experiment(workdir, cache=compilation_cache)
    for name in OUTPUTS:
        assert (workdir / name).stat().st_size > 0, name
    report = json.loads((workdir / "report.json").read_text())
    assert report["test"]["accuracy"] >= 0.9, report["test"]
    assert report["test_patient"]["n_patients"] >= 2
    # The slide verdict rule, fitted on the validation slides, assumes the rate it measured.
    rule = run_folder.read_json(workdir / run_folder.VERDICT_RULE_JSON)
    assert rule["fitted_on"]["slides"] >= 2 and rule["rule"]["min_cells"] == 20
    measured = rule["false_positive_rate"]
    assumed = measured["high"] if rule["candidate"] == "binomial_upper" else measured[
        "false_positive_rate"]  # fmt: skip
    assert rule["rule"]["false_positive_rate"] == pytest.approx(assumed)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, smoke.get_config().num_epochs + 1))


def test_short_run_writes_every_output(short_run):
    for name in OUTPUTS:
        assert (short_run / name).stat().st_size > 0, name
    assert (short_run / "checkpoints" / "latest" / "10").is_dir()
    assert (short_run / "checkpoints" / "best").is_dir()
    config = json.loads((short_run / "config.json").read_text())
    assert config["data"]["synthetic_size"] == 400 and config["num_epochs"] == 2
    rows = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate",
                "images_per_sec", "data_wait_fraction"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in rows), key
    report = json.loads((short_run / "report.json").read_text())
    manifest = json.loads((short_run / "manifest.json").read_text())
    # Every test and validation cell is evaluated exactly once (the eval batch is 128).
    for split in ("test", "validation"):
        n = manifest["splits"][split]["num_examples"]
        assert report[split]["n"] == report["data"][f"num_{split}"] == n
    assert report["data"]["num_validation"] % 128 and report["data"]["num_test"] % 128
    lines = (short_run / "predictions_test.csv").read_text().splitlines()
    assert len(lines) - 1 == report["data"]["num_test"]


def test_short_run_stores_its_calibration_and_operating_points(short_run):
    report = json.loads((short_run / "report.json").read_text())
    record = run_folder.read_calibration(str(short_run))
    assert record["step"] == report["training"]["evaluated_step"] and record["temperature"] > 0
    outputs = np.load(short_run / "test_outputs.npz")
    assert outputs["labels"].tolist() == [
        int(line.split(",")[2])
        for line in (short_run / "predictions_test.csv").read_text().splitlines()[1:]
    ]
    probs = calibration.calibrated_probs(outputs["log_odds"], 1.0)
    assert metrics.binary_metrics(outputs["labels"], probs)["auc"] == pytest.approx(
        report["test"]["auc"], abs=1e-6
    )
    for point in ("spec_95", "spec_98"):
        # The validation threshold applied to the stored test outputs gives the reported result.
        threshold = record[f"threshold_at_{point}"]
        at = metrics.binary_metrics(outputs["labels"], probs, threshold)
        assert report["calibration"][f"threshold_at_{point}"] == threshold
        assert at["sensitivity"] == pytest.approx(report["calibration"][f"sensitivity_at_{point}"])
        assert at["specificity"] == pytest.approx(report["calibration"][f"specificity_at_{point}"])
    assert "Calibration and operating points" in (short_run / "report.md").read_text()


def test_a_rerun_with_another_recipe_is_refused_before_config_json_is_replaced(
    tmp_path, short_run, compilation_cache
):
    workdir = tmp_path / "run"
    shutil.copytree(short_run, workdir)
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    for flag, said in [
        ("--config.model.alpha=0.5", "config.model.alpha=0.5, the run has 0.25"),
        ("--config.data.image_size=48", "config.data.image_size=48, the run has 32"),
    ]:
        done = run_experiment(workdir, *SHORT, flag, cache=compilation_cache, check=False)
        assert done.returncode == 2, done.stderr[-2000:]
        [line] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert f"{workdir} was trained with another recipe ({said})" in line, line
        assert "give a new --workdir" in line and "Traceback" not in done.stderr
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert after.pop(run_folder.LOCK_FILE) == b"" and before.pop(run_folder.LOCK_FILE) == b""
    assert after == before  # config.json, report.json, calibration.json: as they were


def test_an_evaluation_field_rerun_re_evaluates_the_finished_run(
    tmp_path, short_run, compilation_cache
):
    workdir = tmp_path / "run"
    shutil.copytree(short_run, workdir)
    flags = (*SHORT, "--config.test_time_augmentation=True", "--config.log_every_steps=5")
    run_experiment(workdir, *flags, cache=compilation_cache)  # an execution field changes too
    config = json.loads((workdir / "config.json").read_text())
    assert config["test_time_augmentation"] is True and config["log_every_steps"] == 5
    report = json.loads((workdir / "report.json").read_text())
    assert report["training"]["test_time_augmentation"] is True  # evaluated again, with TTA
    assert report["training"]["evaluated_step"] == results(short_run)["training"]["evaluated_step"]
    assert report["history"] == json.loads((short_run / "report.json").read_text())["history"]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, short_run, compilation_cache):
    workdir = tmp_path / "killed"
    # Synchronous saves, so the epoch-1 checkpoint is certainly on disk at the kill.
    flags = (*SHORT, "--config.async_checkpointing=False")
    killed = run_experiment(workdir, *flags, cache=compilation_cache, check=False,
                            env={"MNRES_TEST_KILL_AT_STEP": "7"})  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (workdir / "report.json").exists()
    assert (workdir / "checkpoints" / "latest" / "5").is_dir()
    resumed = run_experiment(workdir, *flags, cache=compilation_cache)
    assert "Resuming from the checkpoint at step 5" in resumed.stderr
    assert without_run_fields(results(workdir)) == without_run_fields(results(short_run))


@pytest.mark.slow
def test_sigkill_during_training_then_resume_equals_uninterrupted(tmp_path, compilation_cache):
    # A real SIGKILL at a moment of the OS's choosing, asynchronous checkpointing on.
    import signal
    import time

    workdir = tmp_path / "sigkill"
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": compilation_cache}
    command = [
        sys.executable, "-m", "experiments.malaria", f"--config={SMOKE}", f"--workdir={workdir}",
        "--config.progress_bar=False", *SHORT, "--config.num_epochs=4",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=environ, stderr=subprocess.DEVNULL)
    history = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and history.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    run_experiment(workdir, *SHORT, "--config.num_epochs=4", cache=compilation_cache)
    reference = tmp_path / "reference"
    run_experiment(reference, *SHORT, "--config.num_epochs=4", cache=compilation_cache)
    assert without_run_fields(results(workdir)) == without_run_fields(results(reference))


def test_same_metrics_on_1_and_8_devices(tmp_path, short_run, compilation_cache):
    workdir = tmp_path / "eight"
    run_experiment(workdir, *SHORT, cache=compilation_cache, devices=8)
    eight, one = results(workdir), results(short_run)
    assert eight["training"]["devices"] == 8 and one["training"]["devices"] == 1
    # Each device sums its share of the batch's kernel gradients before they are added: another
    # summation order than one device's. After ten AdamW steps the losses are ~1e-5 apart on an
    # Intel Xeon and up to 1.7e-4 on an AMD EPYC (jax 0.12.1), and the near-random network's
    # AUC there moves by one of its 432 validation pairs (0.0023).
    assert_close(without_run_fields(eight), without_run_fields(one), tol=5e-4,
                 field_tol={"auc": 2.5 / 432})  # fmt: skip


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, short_run, compilation_cache):
    workdir = tmp_path / "two"
    port = _free_port()
    environ = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": compilation_cache,
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.malaria",
                f"--config={SMOKE}",
                f"--workdir={workdir}",
                "--config.progress_bar=False",
                *SHORT,
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.cpu_collectives=gloo",
            ],  # fmt: skip
            cwd=REPO,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    # Both logs on failure: the process that fails first is often not the one at fault.
    logs = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{err[-3000:]}"
        for i, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True))
    )
    assert all(p.returncode == 0 for p in procs), logs
    two, one = results(workdir), results(short_run)
    assert two["training"]["processes"] == 2 and two["training"]["devices"] == 2
    # Another summation order of the gradients, across processes: 1e-8 apart on jax 0.12.0, but
    # on 0.12.1 a ReLU gate flips in the first epoch and the losses end 1.7e-4 apart, the AUC of
    # the barely trained scores one pair of 432 (0.0023). Crops sharded wrongly, BatchNorm
    # statistics per process or metrics of one process's crops are 1e-2 apart or more.
    assert_close(without_run_fields(two), without_run_fields(one), tol=1e-3,
                 field_tol={"auc": 0.005})  # fmt: skip
    # Checkpoints are written once, not once per process.
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()) == ["10", "5"]


def _short_config():
    config = smoke.get_config()
    config.data.synthetic_size = 400
    config.batch_size = 64
    config.num_epochs = 2
    config.progress_bar = False
    return config


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    schedule = optim.learning_rate_schedule

    def exploding(config, steps_per_epoch, num_epochs):
        # An infinite learning rate from update 7 on: the parameters, then the loss, go NaN.
        base = schedule(config, steps_per_epoch, num_epochs)
        return lambda count: jnp.where(count >= 6, jnp.inf, base(count))

    monkeypatch.setattr(optim, "learning_rate_schedule", exploding)
    with pytest.raises(train.NonFiniteLossError) as error:
        train.train_and_evaluate(_short_config(), str(tmp_path))
    message = str(error.value)
    assert "Training stopped: the loss is nan at step 8" in message
    assert "last good checkpoint (step 5)" in message
    ckpts = checkpoint.Checkpoints(str(tmp_path / "checkpoints"))
    try:
        assert ckpts.latest.all_steps() == [5]
        state = ckpts.latest.restore(5)
    finally:
        ckpts.close()
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state)]
    assert all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")
    assert not (tmp_path / "report.json").exists()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [5]


def test_mock_tfds_end_to_end(tmp_path):
    import tensorflow_datasets as tfds  # a dependency of mnres: no skip without it

    config = _short_config()
    config.data.source = "tfds"
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.num_epochs = 1
    # The mocked download also skips the check that the download host answers.
    probe = mock.patch("mnres.data.sources._check_download_possible")
    with tfds.testing.mock_data(num_examples=120), probe:
        report = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert report["test_patient"] is None  # TFDS has no slide ids
    assert report["test"]["n"] == report["data"]["num_test"] > 0
    for name in OUTPUTS:
        assert (tmp_path / "run" / name).exists(), name
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["source"] == "tfds"


@pytest.mark.slow
def test_paper_config_freezes_only_with_pretrained_weights(tmp_path, caplog):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras", reason="needs Keras: pip install -e '.[test]'")
    from experiments.configs import paper

    net = keras.applications.MobileNet(alpha=1.0, weights=None, input_shape=(32, 32, 3),
                                       include_top=False)  # fmt: skip
    weights = str(tmp_path / "mobilenet.weights.h5")
    net.save_weights(weights)
    config = paper.get_config()
    config.data.source, config.data.synthetic_size, config.data.image_size = "synthetic", 300, 32
    config.batch_size, config.num_epochs, config.progress_bar = 32, 1, False

    report = train.train_and_evaluate(config, str(tmp_path / "scratch"))
    assert report["model"]["frozen_layers"] == []
    assert "Training every layer" in caplog.text

    config.model.pretrained = weights
    report = train.train_and_evaluate(config, str(tmp_path / "pretrained"))
    assert report["model"]["trainable_params"] == 545_282  # the paper's count
    assert report["model"]["frozen_layers"][-1] == "conv_pw_9"
    ckpts = checkpoint.Checkpoints(str(tmp_path / "pretrained" / "checkpoints"))
    try:
        params = ckpts.latest.restore(ckpts.latest_step())["params"]
    finally:
        ckpts.close()
    keras_kernel = net.get_layer("conv_pw_9").get_weights()[0]
    np.testing.assert_array_equal(
        params["block_9"]["pointwise"]["conv_pw_9"]["kernel"], keras_kernel
    )
    trained_kernel = params["block_10"]["pointwise"]["conv_pw_10"]["kernel"]
    assert not np.array_equal(trained_kernel, net.get_layer("conv_pw_10").get_weights()[0])
