"""Metrics of classifiers of K classes (numpy and scipy only), for data of more than two classes.

The conventions of `mnres.metrics`, for K classes:

- ``probs`` is float [N, K], each row the softmax over the classes; a sample is called the most
  probable class (the lowest index of a tie, as ``np.argmax``).
- Confusion matrices are [K, K]: rows are the true class, columns the predicted one.
- A rate whose denominator is zero is 0.0 (scikit-learn's ``zero_division=0``); a one-vs-rest
  ROC AUC is ``None`` where its class or every other class is absent.
- Inputs are checked: empty input, mismatched lengths, labels outside [0, K) and rows that are
  not probabilities raise ``ValueError``.
- Every returned value is a plain Python int/float/list/dict, ready for ``json.dump``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

from mnres import metrics
from mnres.metrics import COLLAPSE_SHARE, COLLAPSE_STD


def _check(labels, probs):
    """Returns (labels int64 [N], probs float64 [N, K]) or raises ValueError."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(
            f"labels must be [N] and probs [N, classes >= 2]; got shapes {labels.shape} and "
            f"{probs.shape}"
        )
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels and probs differ in length: {labels.shape[0]} != {probs.shape[0]}"
        )
    if labels.shape[0] == 0:
        raise ValueError("metrics of an empty set are undefined: got 0 examples")
    if not np.all((labels >= 0) & (labels < probs.shape[1])):
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]})")
    if not np.all(np.isfinite(probs)) or probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError("probs must be probabilities in [0, 1], without NaN")
    return labels.astype(np.int64), probs


def _ratio(num, den) -> float:
    return float(num / den) if den else 0.0


def one_vs_rest_auc(labels, scores, positive: int) -> float | None:
    """Mann-Whitney AUC of `scores` for class `positive` against the rest (midranks for ties);
    None when either side is absent."""
    is_positive = np.asarray(labels) == positive
    n_pos = int(is_positive.sum())
    n_neg = is_positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(np.sum(scipy.stats.rankdata(scores, method="average")[is_positive]))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def confusion_matrix(labels: ArrayLike, predicted: ArrayLike, num_classes: int) -> np.ndarray:
    """int64 [K, K]: row = true class, column = predicted class."""
    index = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(
    labels: ArrayLike, probs: ArrayLike, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Metrics of K-class softmax outputs, each sample called its most probable class.

    Args:
      labels: int [N], class indices.
      probs: float [N, K], the softmax of each sample.
      class_names: the name of each class (default 'class_0', ...).

    Returns:
      dict with n, num_classes, class_names, accuracy, balanced_accuracy (the mean recall),
      macro_precision, macro_recall, macro_f1, auc (the macro one-vs-rest ROC AUC: the mean
      over the classes whose AUC is defined; None if none is), per_class (class, n,
      n_predicted, precision, recall, f1, auc of each class) and confusion_matrix [K, K].
    """
    labels, probs = _check(labels, probs)
    k = probs.shape[1]
    names = list(class_names) if class_names is not None else [f"class_{c}" for c in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    cm = confusion_matrix(labels, np.argmax(probs, -1), k)
    per_class = []
    for c, name in enumerate(names):
        tp, support, called = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        precision, recall = _ratio(tp, called), _ratio(tp, support)
        per_class.append(
            {
                "class": name,
                "n": support,
                "n_predicted": called,
                "precision": precision,
                "recall": recall,
                "f1": _ratio(2 * tp, support + called),
                "auc": one_vs_rest_auc(labels, probs[:, c], c),
            }
        )
    aucs = [row["auc"] for row in per_class if row["auc"] is not None]
    mean = lambda key: float(np.mean([row[key] for row in per_class]))
    return {
        "n": int(labels.shape[0]),
        "num_classes": k,
        "class_names": names,
        "accuracy": float(np.trace(cm) / labels.shape[0]),
        "balanced_accuracy": mean("recall"),
        "macro_precision": mean("precision"),
        "macro_recall": mean("recall"),
        "macro_f1": mean("f1"),
        "auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def calibration_bins(labels: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> dict[str, list]:
    """Top-label reliability bins: confidence = the called (most probable) class's probability.

    The bins of `mnres.metrics.calibration_bins`, for K classes.
    """
    labels, probs = _check(labels, probs)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = probs.max(-1)
    correct = np.argmax(probs, -1) == labels
    return metrics.reliability_bins(confidence, correct, n_bins)


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of |bin| / N * |accuracy - confidence|."""
    return metrics.binned_calibration_error(calibration_bins(labels, probs, n_bins))


def output_collapse(labels: ArrayLike, probs: ArrayLike) -> dict[str, Any]:
    """How near a K-class model is to giving one output for every sample, and the class prior.

    Returns:
      The keys of `mnres.metrics.output_collapse`: std (of the most-called class's
      probability), called_class and called_share (the class called most and its share of the
      calls), prior_class and prior (the majority label and its share) and collapsed
      (``std < COLLAPSE_STD``, or ``called_share >= COLLAPSE_SHARE`` while that class's labels
      are a smaller share).
    """
    labels, probs = _check(labels, probs)
    k = probs.shape[1]
    calls = np.bincount(np.argmax(probs, -1), minlength=k) / labels.shape[0]
    priors = np.bincount(labels, minlength=k) / labels.shape[0]
    called_class, prior_class = int(np.argmax(calls)), int(np.argmax(priors))
    std = float(np.std(probs[:, called_class]))
    called_share = float(calls[called_class])
    return {
        "std": std,
        "called_class": called_class,
        "called_share": called_share,
        "prior_class": prior_class,
        "prior": float(priors[prior_class]),
        "collapsed": bool(
            std < COLLAPSE_STD
            or (called_share >= COLLAPSE_SHARE and priors[called_class] < COLLAPSE_SHARE)
        ),
    }


def softmax(logits: ArrayLike) -> np.ndarray:
    """float64 [N, K] softmax of logits [N, K] (computed in float64)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
