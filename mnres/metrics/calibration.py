"""Temperature scaling and operating points, fitted on validation, stored beside the model.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T > 0 fitted to minimise
the validation negative log-likelihood: the ranking of cells (and so accuracy, ROC and AUC)
is unchanged, only the probabilities move. The NLL of ``logits / T`` is convex in 1 / T (a
log-sum-exp of a linear function), so a bounded golden-section search on 1 / T finds the
optimum without tuning; when validation is perfectly separated the NLL keeps falling as T
shrinks and the search stops at the lower bound.

The operating points are the most sensitive thresholds whose validation specificity is at
least 95% and 98% (``metrics.sensitivity_at_specificity``). They are stored on the scale of
the *uncalibrated* P(parasitized), the probability the model and every export output, so a
consumer calls a cell parasitized iff ``prob >= threshold`` with no temperature involved.
Temperature scaling is monotone, so the same cells are called either way.

Every training run with a validation split writes ``calibration.json`` beside its checkpoints::

  {"temperature": T, "threshold_at_spec_95": t95, "threshold_at_spec_98": t98,
   "threshold_scale": "...", "validation": {...}, "test": {...}}

For data of more than two classes the temperature is fitted the same way on the K-class
logits; operating points, which need a positive class, are left out (``num_classes`` and
``operating_points`` say so) and the ECE is the top-label one over the K classes.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

from mnres import metrics
from mnres.metrics import multiclass

# File names in the run folder (owned by mnres.run_folder).
SPECIFICITIES = (0.95, 0.98)
# Record keys of the points ('spec_95') and the names `predict --operating-point` takes ('spec95').
POINT_KEYS = tuple(f"spec_{round(100 * s)}" for s in SPECIFICITIES)
OPERATING_POINTS = tuple(key.replace("_", "") for key in POINT_KEYS)
TEMPERATURE_BOUNDS = (0.05, 20.0)
THRESHOLD_SCALE = (
    "uncalibrated P(parasitized), as the model and its exports output it: call a cell "
    "parasitized iff prob >= threshold"
)


def _as_logits(logits) -> np.ndarray:
    """float64 [N, C]; a 1-D input is read as the binary log-odds z1 - z0, i.e. [0, z]."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim == 1:
        logits = np.stack([np.zeros_like(logits), logits], -1)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must be [N, classes] with N >= 1 and classes >= 2 (or [N] log-odds); "
            f"got shape {logits.shape}"
        )
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits must be finite")
    return logits


def _check_labels(labels, logits) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels shape {labels.shape} != ({logits.shape[0]},)")
    if not np.all((labels >= 0) & (labels < logits.shape[1])):
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1]})")
    return labels.astype(np.int64)


def log_odds(logits) -> np.ndarray:
    """Binary logits [N, 2] -> log-odds of parasitized, z1 - z0 (float64 [N])."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"log_odds needs binary logits [N, 2], got shape {logits.shape}")
    return logits[:, 1] - logits[:, 0]


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / temperature) (natural log)."""
    logits = _as_logits(logits)
    labels = _check_labels(labels, logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = _log_softmax(logits / temperature)
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels, bounds=TEMPERATURE_BOUNDS, tol: float = 1e-7) -> float:
    """The temperature T in `bounds` that minimises the NLL of ``softmax(logits / T)``.

    Args:
      logits: float [N, C] validation logits, or [N] binary log-odds (z1 - z0).
      labels: int [N] class indices (1 = parasitized).
      bounds: (lowest, highest) temperature searched.
      tol: absolute tolerance on 1 / T.

    Returns:
      T as a Python float; 1.0 means the model was already calibrated on this set.
    """
    logits = _as_logits(logits)
    labels = _check_labels(labels, logits)
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    picked = logits[np.arange(len(labels)), labels]

    def nll(beta):  # beta = 1 / T; convex in beta
        z = beta * logits
        top = z.max(-1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(-1)) - beta * picked))

    # Brent's bounded search on the convex NLL in 1/T.
    found = scipy.optimize.minimize_scalar(
        nll, bounds=(1.0 / high, 1.0 / low), method="bounded", options={"xatol": tol}
    )
    # The ends of the search interval are candidates too (a separated set wants T -> 0).
    candidates = [(nll(x), x) for x in (1.0 / high, float(found.x), 1.0 / low)]
    return float(1.0 / min(candidates)[1])


def calibrated_probs(logits, temperature: float) -> np.ndarray:
    """P(parasitized) = softmax(logits / T)[:, 1] (float64 [N]); [N] input is read as log-odds."""
    logits = _as_logits(logits)
    if logits.shape[1] != 2:
        raise ValueError("calibrated_probs gives P(parasitized) of binary logits [N, 2]")
    return np.exp(_log_softmax(logits / temperature)[:, 1])


def calibrated_class_probs(logits, temperature: float) -> np.ndarray:
    """softmax(logits / T), float64 [N, K]; [N] input is read as binary log-odds."""
    return multiclass.softmax(_as_logits(logits) / temperature)


def calibrate_probs(probs, temperature: float) -> np.ndarray:
    """Temperature-scales probabilities when only they are known (exports output softmax).

    p -> sigmoid(logit(p) / T). Float32 probabilities saturate at 0 and 1 beyond |log-odds|
    ~ 17, so they are clipped to [1e-7, 1 - 1e-7] first; the logits are exact where available.
    """
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1.0 - 1e-7)
    return 1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / temperature))


def operating_points(labels, probs, specificities=SPECIFICITIES) -> dict:
    """``{spec_95: metrics.sensitivity_at_specificity(...), ...}`` keyed by percent."""
    return {
        f"spec_{round(100 * s)}": metrics.sensitivity_at_specificity(labels, probs, s)
        for s in specificities
    }


def threshold_for(record: dict, operating_point: str) -> float | None:
    """The stored threshold of an operating point ('spec95', 'spec98') of a calibration record;
    None when the validation split could not give it (one class absent)."""
    if operating_point not in OPERATING_POINTS:
        raise ValueError(
            f"unknown operating point {operating_point!r}; one of {', '.join(OPERATING_POINTS)}"
        )
    return record.get(f"threshold_at_{POINT_KEYS[OPERATING_POINTS.index(operating_point)]}")


def report_summary(record: dict) -> dict:
    """The flat test-split figures of a record, as reports and cross-validation tables show them:
    temperature, ECE before/after, and per point threshold, sensitivity, specificity (two
    classes only). A record without a test split (a final run) gives the temperature and the
    thresholds alone."""
    test = record.get("test")
    summary = {"temperature": record["temperature"]}
    if test:
        summary.update(ece_before=test["ece_before"], ece_after=test["ece_after"])
    if record.get("num_classes", 2) != 2:
        return summary
    for point in POINT_KEYS:
        if not test:
            summary[f"threshold_at_{point}"] = record[f"threshold_at_{point}"]
            continue
        for key in ("threshold", "sensitivity", "specificity"):
            summary[f"{key}_at_{point}"] = test[f"at_{point}"][key]
    return summary


def calibrate(val_logits, val_labels, test_logits=None, test_labels=None, n_bins: int = 15):
    """Fits T and the operating points on validation; measures both on test if given.

    Args:
      val_logits, test_logits: binary logits [N, 2] (or [N] log-odds), or logits [N, K].
      val_labels, test_labels: int [N], 1 = parasitized (class indices for K classes).
      n_bins: ECE bins.

    Returns:
      The calibration.json record: temperature, threshold_at_spec_95/98 (uncalibrated
      P(parasitized) scale; None if validation lacks a class), threshold_scale, and per split
      nll/ece before and after scaling and, on test, the sensitivity and specificity reached
      with the validation thresholds. For K > 2 classes: temperature, num_classes, and per
      split nll/ece before and after scaling (`calibrate_multiclass`).
    """
    if _as_logits(val_logits).shape[1] != 2:
        return calibrate_multiclass(val_logits, val_labels, test_logits, test_labels, n_bins)
    temperature = fit_temperature(val_logits, val_labels)
    record = {"temperature": temperature}
    val_probs = calibrated_probs(val_logits, 1.0)
    points = operating_points(val_labels, val_probs)
    for key, point in points.items():
        record[f"threshold_at_{key}"] = point["threshold"]
    record["threshold_scale"] = THRESHOLD_SCALE
    splits = {"validation": (val_logits, val_labels)}
    if test_logits is not None:
        splits["test"] = (test_logits, test_labels)
    for name, (logits, labels) in splits.items():
        before, after = calibrated_probs(logits, 1.0), calibrated_probs(logits, temperature)
        entry = {
            "n": int(len(labels)),
            "nll_before": negative_log_likelihood(logits, labels, 1.0),
            "nll_after": negative_log_likelihood(logits, labels, temperature),
            "ece_before": metrics.expected_calibration_error(labels, before, n_bins),
            "ece_after": metrics.expected_calibration_error(labels, after, n_bins),
        }
        for key, point in points.items():
            if name == "validation" or point["threshold"] is None:
                entry[f"at_{key}"] = point
                continue
            at = metrics.binary_metrics(labels, before, point["threshold"])
            entry[f"at_{key}"] = {
                "threshold": point["threshold"],
                "sensitivity": at["sensitivity"],
                "specificity": at["specificity"],
                "target_specificity": point["target_specificity"],
            }
        record[name] = entry
    return record


def calibrate_multiclass(val_logits, val_labels, test_logits=None, test_labels=None, n_bins=15):
    """`calibrate` for logits [N, K] of K > 2 classes: the temperature and the NLL and top-label
    ECE before and after scaling; no operating points (they need a positive class)."""
    temperature = fit_temperature(val_logits, val_labels)
    k = _as_logits(val_logits).shape[1]
    record = {
        "temperature": temperature,
        "num_classes": k,
        "operating_points": f"none: thresholds at a specificity need two classes, not {k}",
    }
    splits = {"validation": (val_logits, val_labels)}
    if test_logits is not None:
        splits["test"] = (test_logits, test_labels)
    for name, (logits, labels) in splits.items():
        before = calibrated_class_probs(logits, 1.0)
        after = calibrated_class_probs(logits, temperature)
        record[name] = {
            "n": int(len(labels)),
            "nll_before": negative_log_likelihood(logits, labels, 1.0),
            "nll_after": negative_log_likelihood(logits, labels, temperature),
            "ece_before": multiclass.expected_calibration_error(labels, before, n_bins),
            "ece_after": multiclass.expected_calibration_error(labels, after, n_bins),
        }
    return record
