"""Temperature scaling and operating points, checked against scikit-learn and scipy."""

import json

import numpy as np
import pytest
import sklearn.metrics as skm
from scipy import optimize
from sklearn.linear_model import LogisticRegression

from mnres import metrics, run_folder
from mnres.metrics import calibration


def _overconfident(seed, n=2000, scale=3.0):
    """Binary log-odds that are calibrated at T = 1, then multiplied by `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return scale * z, labels


@pytest.mark.parametrize("seed", range(4))
def test_fit_temperature_matches_logistic_regression(seed):
    # Binary temperature scaling is logistic regression on the log-odds without intercept:
    # its coefficient is 1 / T.
    log_odds, labels = _overconfident(seed, scale=1.0 + seed)
    temperature = calibration.fit_temperature(log_odds, labels)
    lr = LogisticRegression(fit_intercept=False, C=1e12, tol=1e-12, max_iter=10_000)
    lr.fit(log_odds[:, None], labels)
    assert temperature == pytest.approx(1.0 / lr.coef_[0, 0], rel=1e-5)
    assert temperature == pytest.approx(1.0 + seed, rel=0.15)


def test_fit_temperature_matches_scipy_for_three_classes():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 3, (500, 3))
    labels = np.argmax(logits + rng.gumbel(0, 2, logits.shape), -1)
    temperature = calibration.fit_temperature(logits, labels)
    nll = lambda t: skm.log_loss(labels, _softmax(logits / t), labels=[0, 1, 2])
    reference = optimize.minimize_scalar(nll, bounds=(0.05, 20), method="bounded",
                                         options={"xatol": 1e-9})  # fmt: skip
    assert temperature == pytest.approx(reference.x, rel=1e-4)


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_negative_log_likelihood_matches_sklearn():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (300, 2))
    labels = rng.integers(0, 2, 300)
    for t in (0.5, 1.0, 2.5):
        got = calibration.negative_log_likelihood(logits, labels, t)
        assert got == pytest.approx(skm.log_loss(labels, _softmax(logits / t)), rel=1e-10)
    # [N] input is read as the log-odds z1 - z0.
    log_odds = calibration.log_odds(logits)
    assert calibration.negative_log_likelihood(log_odds, labels, 2.0) == pytest.approx(
        calibration.negative_log_likelihood(logits, labels, 2.0), rel=1e-12
    )


def test_logit_offset_does_not_matter():
    log_odds, labels = _overconfident(3)
    logits = np.stack([np.full_like(log_odds, 5.0), 5.0 + log_odds], -1)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(
        calibration.fit_temperature(log_odds, labels), rel=1e-9
    )


def test_temperature_scaling_reduces_ece_and_keeps_ranking():
    log_odds, labels = _overconfident(0, n=4000, scale=4.0)
    temperature = calibration.fit_temperature(log_odds[:2000], labels[:2000])
    before = calibration.calibrated_probs(log_odds[2000:], 1.0)
    after = calibration.calibrated_probs(log_odds[2000:], temperature)
    test = labels[2000:]
    assert metrics.expected_calibration_error(test, after) < 0.5 * (
        metrics.expected_calibration_error(test, before)
    )
    assert metrics.binary_metrics(test, after)["auc"] == pytest.approx(
        metrics.binary_metrics(test, before)["auc"], abs=1e-12
    )


def test_edge_cases():
    # Perfectly separated: the NLL keeps falling as T shrinks; the search stops at the bound.
    log_odds = np.array([-3.0, -1.0, 2.0, 4.0])
    assert calibration.fit_temperature(log_odds, [0, 0, 1, 1]) == pytest.approx(0.05)
    # Every prediction equal: the NLL does not depend on T; any T in bounds, probs stay 0.5.
    t = calibration.fit_temperature(np.zeros(6), [0, 1, 0, 1, 1, 0])
    assert 0.05 <= t <= 20.0
    np.testing.assert_allclose(calibration.calibrated_probs(np.zeros(6), t), 0.5)
    # One class absent: still a well-defined 1-D problem.
    log_odds, labels = np.array([1.0, 2.0, -0.5]), np.ones(3, np.int64)
    nll = lambda t: calibration.negative_log_likelihood(log_odds, labels, t)
    reference = optimize.minimize_scalar(nll, bounds=(0.05, 20), method="bounded")
    assert calibration.fit_temperature(log_odds, labels) == pytest.approx(reference.x, rel=1e-3)
    assert calibration.fit_temperature(np.abs(log_odds), labels) == pytest.approx(0.05)
    for bad_logits, bad_labels in (
        (np.zeros((0, 2)), []),
        (np.array([[0.0, np.nan]]), [1]),
        (np.zeros((3, 2)), [0, 1]),
        (np.zeros((2, 2)), [0, 2]),
    ):
        with pytest.raises(ValueError):
            calibration.fit_temperature(bad_logits, bad_labels)


def test_calibrate_probs_matches_calibrated_probs():
    log_odds = np.linspace(-12, 12, 101)  # float32 probs: ~1e-5 agreement
    probs = calibration.calibrated_probs(log_odds, 1.0).astype(np.float32)
    np.testing.assert_allclose(
        calibration.calibrate_probs(probs, 2.0), calibration.calibrated_probs(log_odds, 2.0),
        atol=1e-5,
    )  # fmt: skip


def test_calibrate_record(tmp_path):
    val_z, val_y = _overconfident(0, n=1500)
    test_z, test_y = _overconfident(1, n=1500)
    val_logits = np.stack([np.zeros_like(val_z), val_z], -1)
    test_logits = np.stack([np.zeros_like(test_z), test_z], -1)
    record = calibration.calibrate(val_logits, val_y, test_logits, test_y)
    assert record["temperature"] == pytest.approx(3.0, rel=0.15)
    val_probs = calibration.calibrated_probs(val_logits, 1.0)
    for key, spec in (("spec_95", 0.95), ("spec_98", 0.98)):
        point = metrics.sensitivity_at_specificity(val_y, val_probs, spec)
        assert record[f"threshold_at_{key}"] == point["threshold"]
        # On test, the validation threshold on the uncalibrated probability scale.
        at = metrics.binary_metrics(
            test_y, calibration.calibrated_probs(test_logits, 1.0), point["threshold"]
        )
        assert record["test"][f"at_{key}"]["sensitivity"] == at["sensitivity"]
        assert record["test"][f"at_{key}"]["specificity"] == at["specificity"]
        assert at["specificity"] > spec - 0.03
    assert record["test"]["ece_after"] < record["test"]["ece_before"]
    assert record["validation"]["nll_after"] <= record["validation"]["nll_before"]
    run_folder.write_calibration(str(tmp_path), record)
    assert run_folder.read_calibration(str(tmp_path)) == json.loads(json.dumps(record))
    assert run_folder.read_calibration(str(tmp_path / "missing")) is None


def test_calibrate_without_a_validation_class():
    logits = np.stack([np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0])], -1)
    record = calibration.calibrate(logits, [1, 1, 1, 1], logits, [0, 1, 0, 1])
    assert record["threshold_at_spec_95"] is None and record["threshold_at_spec_98"] is None
    assert record["test"]["at_spec_95"]["sensitivity"] is None
    json.dumps(record, allow_nan=False)
