"""The run folder: its files written and read back, and a run folder written by mnres 0.1."""

import csv
import json
import math
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mnres import data, inference, run_folder
from mnres.data.augment import preprocess
from mnres.data.splits import Split

RUN_V0_1 = str(Path(__file__).parent / "testdata" / "run_v0.1.0")


def test_write_json_is_one_plain_sorted_format(tmp_path):
    path = str(tmp_path / "sub" / "x.json")  # the folder is created
    config = ml_collections.ConfigDict({"b": 1, "a": (1, 2)})
    obj = {"z": np.float32(0.5), "a": np.arange(2), "nan": math.nan, "c": config, "o": Path("p")}
    run_folder.write_json(path, obj)
    text = Path(path).read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "a": [')
    assert list(json.loads(text)) == sorted(obj)
    assert run_folder.read_json(path) == {
        "a": [0, 1], "c": {"a": [1, 2], "b": 1}, "nan": None, "o": "p", "z": 0.5,
    }  # fmt: skip


def test_config_is_written_as_ml_collections_writes_it(tmp_path):
    from experiments.configs import smoke

    config = smoke.get_config()
    run_folder.write_config(str(tmp_path), config)
    text = (tmp_path / run_folder.CONFIG_JSON).read_text()
    # Byte for byte what mnres 0.1 wrote (ConfigDict's own JSON writer).
    assert text == config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    read = run_folder.read_config(str(tmp_path))
    assert read.model.to_dict() == config.model.to_dict() and read.batch_size == config.batch_size


def test_history_rows_append_truncate_and_read_back(tmp_path):
    workdir = str(tmp_path)
    assert run_folder.read_history(workdir) == []  # no epoch finished yet
    rows = [
        {"epoch": e, "step": 10 * e, "val_accuracy": None, "train_loss": 1 / e} for e in (1, 2, 3)
    ]
    for row in rows:
        run_folder.append_history_row(workdir, row)
    lines = (tmp_path / run_folder.METRICS_JSONL).read_text().splitlines()
    assert lines == [json.dumps(r) for r in rows]  # one compact line per row, keys in order
    assert run_folder.read_history(workdir) == rows
    assert run_folder.read_history(workdir, last_step=20) == rows[:2]
    run_folder.write_history(workdir, rows[:1])
    assert run_folder.read_history(workdir) == rows[:1]


def test_torn_and_repeated_history_rows(tmp_path):
    rows = [{"epoch": 1, "step": 5}, {"epoch": 2, "step": 10}]
    lines = [json.dumps(r) for r in rows] + [json.dumps({"epoch": 2, "step": 10, "x": 1})]
    (tmp_path / run_folder.METRICS_JSONL).write_text("\n".join(lines) + '\n{"epoch": 3, "st')
    assert run_folder.read_history(str(tmp_path)) == [rows[0], {"epoch": 2, "step": 10, "x": 1}]
    (tmp_path / run_folder.METRICS_JSONL).write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        run_folder.read_history(str(tmp_path))


def test_predictions_and_test_outputs(tmp_path):
    workdir = str(tmp_path)
    split = Split(
        images=np.zeros((3, 4, 4, 3), np.uint8),
        labels=np.array([0, 1, 1], np.int32),
        slide_ids=np.array(["s1", "s1", "s2"]),
        names=np.array(["a.png", "b.png", "c.png"]),
    )
    run_folder.write_predictions(workdir, split, np.array([0.1, 0.25, 0.9999999], np.float32))
    with open(tmp_path / run_folder.PREDICTIONS_CSV, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["name", "slide_id", "label", "prob_parasitized"],
        ["a.png", "s1", "0", "0.100000"],
        ["b.png", "s1", "1", "0.250000"],
        ["c.png", "s2", "1", "1.000000"],
    ]
    log_odds = np.array([-2.0, 0.5, 3.0], np.float32)
    run_folder.write_test_outputs(
        workdir, log_odds=log_odds, labels=split.labels, slide_ids=split.slide_ids,
        names=split.names,
    )  # fmt: skip
    outputs = run_folder.read_test_outputs(workdir)
    assert sorted(outputs) == ["labels", "log_odds", "names", "slide_ids"]
    np.testing.assert_array_equal(outputs["log_odds"], log_odds)
    assert outputs["log_odds"].dtype == np.float32 and outputs["labels"].dtype == np.int32
    assert list(outputs["names"]) == ["a.png", "b.png", "c.png"]


def test_calibration_and_report_files(tmp_path):
    workdir = str(tmp_path / "run")
    assert run_folder.read_calibration(workdir) is None
    record = {"temperature": 1.5, "threshold_at_spec_95": None, "test": {"n": np.int64(3)}}
    path = run_folder.write_calibration(workdir, record)
    assert path == os.path.join(workdir, run_folder.CALIBRATION_JSON)
    assert run_folder.read_calibration(workdir) == {**record, "test": {"n": 3}}
    (tmp_path / "run" / run_folder.ROC_PNG).write_bytes(b"")
    (tmp_path / "run" / run_folder.HISTORY_PNG).write_bytes(b"")
    assert run_folder.plot_files(workdir) == [run_folder.HISTORY_PNG, run_folder.ROC_PNG]
    run_folder.write_report(workdir, {"test": {"auc": math.inf}}, "# Report\n")
    assert run_folder.read_report(workdir) == {"test": {"auc": None}}
    assert (tmp_path / "run" / run_folder.REPORT_MD).read_text() == "# Report\n"


def test_run_folder_names_have_one_home():
    from mnres.metrics import calibration
    from mnres.reporting import report
    from mnres.training import loop as train

    assert run_folder.REPORT_JSON == "report.json"
    # The 0.1 second names of the run folder's files and readers are gone.
    for module, name in [
        (report, "REPORT_JSON"), (report, "METRICS_JSONL"), (train, "TEST_OUTPUTS_NPZ"),
        (calibration, "read_calibration"), (report, "read_history"),
    ]:  # fmt: skip
        assert not hasattr(module, name), f"{module.__name__}.{name}"


def test_load_run_of_version_0_1_gives_finite_logits():
    classifier = run_folder.load_run(RUN_V0_1)
    assert classifier.image_size == 32
    assert classifier.metadata["checkpoint"] == "best" and classifier.metadata["step"] == 10
    assert classifier.config.model.name == "mobilenet_v1_residual"
    zeros = jnp.zeros((2, classifier.image_size, classifier.image_size, 3))
    logits = np.asarray(inference.classify(classifier.model, classifier.variables, zeros))
    assert logits.shape == (2, 2) and np.all(np.isfinite(logits))
    latest = run_folder.load_run(RUN_V0_1, which="latest")
    assert latest.metadata["checkpoint"] == "latest"


def test_version_0_1_run_reproduces_its_test_outputs():
    # The synthetic data is a function of the config: the restored weights must score its
    # test split as the run did when it wrote test_outputs.npz.
    classifier = run_folder.load_run(RUN_V0_1)
    config = run_folder.read_config(RUN_V0_1)
    test = data.load_dataset(config.data, config.seed).test
    outputs = run_folder.read_test_outputs(RUN_V0_1)
    np.testing.assert_array_equal(test.names, outputs["names"])
    np.testing.assert_array_equal(test.labels, outputs["labels"])
    tta = bool(config.get("test_time_augmentation"))
    logits = np.asarray(
        inference.classify(classifier.model, classifier.variables, preprocess(test.images), tta=tta)
    )
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], outputs["log_odds"], atol=1e-5)


def test_version_0_1_files_read_back():
    history = run_folder.read_history(RUN_V0_1)
    assert [row["epoch"] for row in history] == [1] and history[0]["step"] == 10
    record = run_folder.read_calibration(RUN_V0_1)
    assert record["temperature"] > 0 and record["step"] == 10
    assert set(record) >= {"threshold_at_spec_95", "threshold_at_spec_98", "validation", "test"}
    report = run_folder.read_report(RUN_V0_1)
    assert report["history"] == history
    assert report["training"]["evaluated_step"] == 10
    assert run_folder.read_manifest(RUN_V0_1)["source"] == "synthetic"
    assert len(run_folder.read_test_outputs(RUN_V0_1)["log_odds"]) == report["data"]["num_test"]


def test_load_run_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="not a training run"):
        run_folder.load_run(str(tmp_path))
    with pytest.raises(ValueError, match="use 'best' or 'latest'"):
        run_folder.load_run(RUN_V0_1, which="first")
    empty = tmp_path / "empty"
    (empty / run_folder.CHECKPOINTS_DIR).mkdir(parents=True)
    shutil.copy(os.path.join(RUN_V0_1, run_folder.CONFIG_JSON), empty)
    with pytest.raises(ValueError, match="no checkpoint"):
        run_folder.load_run(str(empty))


# Writes a calibration sample under a file size limit (a full disk's EFBIG); prints the error.
FULL_DISK_WRITE = """
import resource, signal, sys
import numpy as np
from mnres import run_folder

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write raises instead of the signal
resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, resource.RLIM_INFINITY))
noise = np.random.default_rng(0).integers(0, 256, (64, 64, 64, 3), np.uint8)  # 768 KiB
try:
    run_folder.write_calibration_sample(sys.argv[1], noise)
except OSError as e:
    print(e.strerror)
"""


def test_calibration_sample_is_written_whole_or_not_at_all_on_a_full_disk(tmp_path):
    import subprocess
    import sys

    workdir = str(tmp_path)
    kept = np.zeros((4, 8, 8, 3), np.uint8)
    run_folder.write_calibration_sample(workdir, kept)
    done = subprocess.run([sys.executable, "-c", FULL_DISK_WRITE, workdir], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], timeout=120)  # fmt: skip
    assert done.stdout.strip() == "File too large", done.stderr[-2000:]
    # The earlier sample is intact and no temporary file is left.
    np.testing.assert_array_equal(run_folder.read_calibration_sample(workdir), kept)
    assert os.listdir(workdir) == [run_folder.CALIBRATION_SAMPLE_NPZ]
