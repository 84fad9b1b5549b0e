"""A final run: every slide trains but a validation split, which chooses the checkpoint and
fits the calibration; no test split, so no held-out figure, and the report says so."""

import os

import numpy as np
import pytest
from data_fixtures import tiny_crossval_config

from mnres import run_folder
from mnres.config import ConfigError
from mnres.deploy import predict
from mnres.metrics import calibration
from mnres.training import ensemble as ensemble_run
from mnres.training import loop

FINAL = (0.8, 0.2, 0.0)


def final_config(**changes):
    config = tiny_crossval_config()
    config.data.split_fractions = FINAL
    for key, value in changes.items():
        setattr(config.model, key, value)
    return config


@pytest.fixture(scope="module")
def final_runs(tmp_path_factory):
    """Two tiny final runs of one split and their reports: plain input with seed 0, and
    gray-world input with seed 1 on seed 0's split (`config.data.split_seed`)."""
    root = tmp_path_factory.mktemp("final")
    runs = {}
    for name, normalization, seed in (("plain", "none", 0), ("gray", "gray_world", 1)):
        config = final_config(input_normalization=normalization)
        config.seed, config.data.split_seed = seed, 0
        workdir = str(root / name)
        runs[name] = (workdir, loop.train_and_evaluate(config, workdir))
    return runs


def test_a_final_run_reports_validation_only_and_says_nothing_is_held_out(final_runs):
    workdir, report = final_runs["plain"]
    assert report["data"]["num_test"] == 0 and report["data"]["num_validation"] > 0
    assert report["test"] is None and report["test_patient"] is None
    assert report["validation"]["n"] == report["data"]["num_validation"]
    with open(os.path.join(workdir, run_folder.REPORT_MD)) as f:
        page = f.read()
    assert "No test split" in page and "| Metric | validation |" in page
    # Nothing of a test split is written, and nothing claims one.
    for name in (run_folder.TEST_OUTPUTS_NPZ, run_folder.CONFUSION_MATRIX_PNG, run_folder.ROC_PNG):
        assert not os.path.exists(os.path.join(workdir, name)), name
    assert "test" not in page.lower().replace("no test split", "").split("## data")[0]


def test_a_final_run_is_calibrated_on_validation_and_loads_as_a_model(final_runs):
    workdir, report = final_runs["plain"]
    record = run_folder.read_json(os.path.join(workdir, run_folder.CALIBRATION_JSON))
    assert "test" not in record and record["validation"]["n"] == report["data"]["num_validation"]
    assert report["calibration"] == calibration.report_summary(record)
    assert set(report["calibration"]) == {
        "temperature",
        "threshold_at_spec_95",
        "threshold_at_spec_98",
    }
    predictor = predict.load_predictor(workdir)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probs = np.asarray(predictor.run(images))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    threshold = predict.operating_threshold(workdir, "spec95")
    assert threshold == report["calibration"]["threshold_at_spec_95"]


def test_final_runs_combine_into_an_ensemble_without_a_test_split(final_runs, tmp_path):
    members = [final_runs[name][0] for name in ("plain", "gray")]
    workdir = str(tmp_path / "ensemble")
    report = ensemble_run.combine(members, workdir)
    assert report["test"] is None and report["validation"]["n"] > 0
    assert report["members"][0]["test"] is None
    assert "test" not in run_folder.read_json(os.path.join(workdir, run_folder.CALIBRATION_JSON))
    assert not os.path.exists(os.path.join(workdir, run_folder.TEST_OUTPUTS_NPZ))
    assert os.path.exists(os.path.join(workdir, run_folder.CALIBRATION_SAMPLE_NPZ))


def test_a_run_with_neither_validation_nor_test_is_refused_before_training(tmp_path):
    config = tiny_crossval_config()
    config.data.split_fractions = (1.0, 0.0, 0.0)
    with pytest.raises(
        ConfigError, match=r"validation and test splits are both empty.*0\.9, 0\.1, 0\.0"
    ):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / run_folder.CHECKPOINTS_DIR)


def test_the_calibration_summary_without_a_test_split_keeps_the_thresholds():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    log_odds = 3 * (labels - 0.5) + rng.normal(0, 1.5, 400)
    alone = calibration.calibrate(log_odds, labels)
    tested = calibration.calibrate(log_odds, labels, log_odds, labels)
    summary, full = calibration.report_summary(alone), calibration.report_summary(tested)
    for key in ("temperature", "threshold_at_spec_95", "threshold_at_spec_98"):
        assert summary[key] == full[key]
    assert "ece_after" in full and "ece_after" not in summary
