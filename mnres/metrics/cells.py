"""Cell-level metrics for binary classifiers (numpy only); the patient level is
`mnres.metrics.slides`.

Conventions, shared by every function here:

- The positive class is 1 = parasitized; ``probs`` is P(parasitized), a 1-D array in [0, 1].
- A cell is called parasitized iff ``probs >= threshold`` (the ``roc_curve`` convention, so every
  ROC point is an operating threshold).
- Confusion matrices are ``[[tn, fp], [fn, tp]]``: rows are the true label 0/1, columns the
  predicted label 0/1 (scikit-learn's layout).
- A rate whose denominator is zero is 0.0, as scikit-learn's ``zero_division=0``: precision with
  no positive predictions, recall (sensitivity) with no positive labels, specificity with no
  negative labels, F1 with no positives at all. MCC is 0.0 when any marginal is empty (as
  scikit-learn). ROC AUC is ``None`` (JSON null) when one class is absent. Counts sit next to
  every rate so a reader can tell a 0.0 from an undefined one.
- Inputs are checked: empty input, mismatched lengths, labels other than 0/1 and probabilities
  outside [0, 1] (or NaN) raise ``ValueError``.
- Every returned value is a plain Python int/float/list/dict, ready for ``json.dump``.
"""

from typing import Any

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike


def _check(labels, probs):
    """Returns (labels int64 [N], probs float64 [N]) or raises ValueError."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 1:
        raise ValueError(
            f"labels and probs must be 1-D (probs = P(parasitized), e.g. softmax[:, 1]); "
            f"got shapes {labels.shape} and {probs.shape}"
        )
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels and probs differ in length: {labels.shape[0]} != {probs.shape[0]}"
        )
    if labels.shape[0] == 0:
        raise ValueError("metrics of an empty set are undefined: got 0 examples")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"labels must be 0 or 1; got values {np.unique(labels)[:10].tolist()}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(
            f"probs must be probabilities in [0, 1]; got range [{np.nanmin(probs)}, "
            f"{np.nanmax(probs)}] with {int(np.sum(~np.isfinite(probs)))} non-finite values"
        )
    return labels.astype(np.int64), probs


def _ratio(num, den):
    return float(num / den) if den else 0.0


def _confusion(labels, predicted):
    tp = int(np.sum((labels == 1) & (predicted == 1)))
    fp = int(np.sum((labels == 0) & (predicted == 1)))
    fn = int(np.sum((labels == 1) & (predicted == 0)))
    tn = int(np.sum((labels == 0) & (predicted == 0)))
    return tn, fp, fn, tp


def _auc(labels, scores):
    """Mann-Whitney AUC with midranks for tied scores; None if one class is absent."""
    n_pos = int(np.sum(labels == 1))
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Ranks 1..N; tied scores share their mean rank (midranks).
    rank_sum = float(np.sum(scipy.stats.rankdata(scores, method="average")[labels == 1]))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def binary_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """Cell-level metrics of P(parasitized) scores at one decision threshold.

    Args:
      labels: int [N], 1 = parasitized.
      probs: float [N], P(parasitized) in [0, 1].
      threshold: a cell is called parasitized iff ``probs >= threshold``.

    Returns:
      dict with n, n_parasitized, n_uninfected, accuracy, balanced_accuracy, precision, recall,
      sensitivity (== recall), specificity, f1, mcc, auc (None if one class is absent),
      confusion_matrix ``[[tn, fp], [fn, tp]]`` and threshold. See the module docstring for the
      values of undefined rates.
    """
    labels, probs = _check(labels, probs)
    tn, fp, fn, tp = _confusion(labels, (probs >= threshold).astype(np.int64))
    n = tn + fp + fn + tp
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    # Python ints: the product of four counts overflows int64 beyond ~55k examples per class.
    mcc_den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    mcc = float((tp * tn - fp * fn) / np.sqrt(float(mcc_den))) if mcc_den else 0.0
    return {
        "n": n,
        "n_parasitized": tp + fn,
        "n_uninfected": tn + fp,
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": (recall + specificity) / 2.0,
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "sensitivity": recall,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": mcc,
        "auc": _auc(labels, probs),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
    }


def roc_curve(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full ROC curve (no points dropped).

    Args:
      labels: int [N], 1 = parasitized.
      probs: float [N], P(parasitized).

    Returns:
      (fpr, tpr, thresholds), float arrays of equal length: the point i is the operating point of
      ``probs >= thresholds[i]``. thresholds decrease; thresholds[0] is +inf (the point (0, 0)),
      as scikit-learn >= 1.3. With one class absent the rate of the absent class (fpr without
      negatives, tpr without positives) is NaN, as scikit-learn.
    """
    labels, probs = _check(labels, probs)
    order = np.argsort(-probs, kind="stable")
    scores, sorted_labels = probs[order], labels[order]
    # The last index of each run of equal scores: all tied examples switch together.
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.shape[0] - 1]
    tps = np.cumsum(sorted_labels)[last]
    fps = (last + 1) - tps
    tps, fps = np.r_[0, tps].astype(np.float64), np.r_[0, fps].astype(np.float64)
    thresholds = np.r_[np.inf, scores[last]]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] else np.full_like(fps, np.nan)
        tpr = tps / tps[-1] if tps[-1] else np.full_like(tps, np.nan)
    return fpr, tpr, thresholds


def calibration_bins(labels: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> dict[str, list[Any]]:
    """Top-label reliability bins (Guo et al. 2017): confidence = max(p, 1 - p) of the called class.

    Bins are equal-width on [0, 1], bin b holding confidences in (b / n_bins, (b + 1) / n_bins];
    for two classes only the upper half can be occupied.

    Returns:
      dict of lists, one entry per bin: lower, upper, count, confidence (mean, None if empty),
      accuracy (of the called class, None if empty).
    """
    labels, probs = _check(labels, probs)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = np.maximum(probs, 1.0 - probs)
    correct = (probs >= 0.5).astype(np.int64) == labels
    return reliability_bins(confidence, correct, n_bins)


def reliability_bins(confidence, correct, n_bins: int) -> dict[str, list]:
    """Equal-width bins of the called class's confidence, with its accuracy per bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins: index b holds (edges[b], edges[b + 1]].
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    out = {"lower": [], "upper": [], "count": [], "confidence": [], "accuracy": []}
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
        out["count"].append(count)
        out["confidence"].append(float(confidence[mask].mean()) if count else None)
        out["accuracy"].append(float(correct[mask].mean()) if count else None)
    return out


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): sum over bins of |bin| / N * |accuracy - confidence|."""
    return binned_calibration_error(calibration_bins(labels, probs, n_bins))


def binned_calibration_error(bins: dict[str, list]) -> float:
    """ECE of reliability bins: sum over bins of |bin| / N * |accuracy - confidence|."""
    n = sum(bins["count"])
    return float(
        sum(
            count / n * abs(acc - conf)
            for count, acc, conf in zip(
                bins["count"], bins["accuracy"], bins["confidence"], strict=True
            )
            if count
        )
    )


def sensitivity_at_specificity(
    labels: ArrayLike, probs: ArrayLike, specificity: float
) -> dict[str, float | None]:
    """The most sensitive operating point whose specificity is at least ``specificity``.

    Returns:
      dict: threshold (call parasitized iff ``probs >= threshold``), sensitivity and specificity
      achieved on these labels, and target_specificity. If even calling nothing parasitized is
      the answer, threshold is the next float above max(probs). threshold, sensitivity and
      specificity are None if one class is absent.
    """
    labels, probs = _check(labels, probs)
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must be in [0, 1], got {specificity}")
    out = {"threshold": None, "sensitivity": None, "specificity": None}
    out["target_specificity"] = float(specificity)
    if np.all(labels == 1) or np.all(labels == 0):
        return out
    fpr, tpr, thresholds = roc_curve(labels, probs)
    # tpr never decreases along the curve, so the last admissible point is the most sensitive.
    i = int(np.nonzero(1.0 - fpr >= specificity - 1e-12)[0][-1])
    threshold = thresholds[i] if np.isfinite(thresholds[i]) else np.nextafter(probs.max(), np.inf)
    out.update(threshold=float(threshold), sensitivity=float(tpr[i]), specificity=float(1 - fpr[i]))
    return out


# A model gives "one output for every crop" when P(parasitized) barely varies, or when one class
# takes this share of the calls while the labels are not that lopsided.
COLLAPSE_STD = 0.01
COLLAPSE_SHARE = 0.99


def output_collapse(labels: ArrayLike, probs: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """How near a model is to giving one output for every crop, and the class prior.

    Args:
      labels: true labels (0/1), [N].
      probs: P(parasitized), [N].
      threshold: parasitized iff ``probs >= threshold``.

    Returns:
      ``{"std", "called_class", "called_share", "prior_class", "prior", "collapsed"}``: the std
      of ``probs``, the class called most and its share of the calls, the majority label and its
      share (the accuracy of always calling it), and whether the outputs collapsed
      (``std < COLLAPSE_STD``, or ``called_share >= COLLAPSE_SHARE`` while the labels of that
      class are a smaller share).
    """
    labels, probs = _check(labels, probs)
    positive = float(np.mean(probs >= threshold))
    called_class = int(positive >= 0.5)
    called_share = max(positive, 1.0 - positive)
    label_share = float(np.mean(labels == called_class))
    prior_positive = float(np.mean(labels))
    std = float(np.std(probs))
    return {
        "std": std,
        "called_class": called_class,
        "called_share": called_share,
        "prior_class": int(prior_positive > 0.5),
        "prior": max(prior_positive, 1.0 - prior_positive),
        "collapsed": bool(
            std < COLLAPSE_STD or (called_share >= COLLAPSE_SHARE and label_share < COLLAPSE_SHARE)
        ),
    }
