"""Patient-level metrics for binary classifiers (numpy only): each slide is one patient.

The conventions are `mnres.metrics.cells`' (1 = parasitized, ``probs`` = P(parasitized), a cell
called parasitized iff ``probs >= threshold``, confusion matrices ``[[tn, fp], [fn, tp]]``,
checked inputs, plain JSON values).
"""

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from mnres.metrics.cells import _auc, _check, _confusion, _ratio


def _check_slides(labels, probs, slide_ids):
    labels, probs = _check(labels, probs)
    # tfds hands strings over as bytes.
    slide_ids = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in slide_ids])
    if slide_ids.shape != labels.shape:
        raise ValueError(f"slide_ids shape {slide_ids.shape} != labels shape {labels.shape}")
    return labels, probs, slide_ids


def slide_table(
    labels: ArrayLike, probs: ArrayLike, slide_ids: Iterable[str | bytes], threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Per-slide (= per-patient) summary, sorted by slide id.

    Cells with an unknown slide id ('') are left out.

    Returns:
      list of dicts: slide_id, n_cells, n_parasitized_true, true_fraction,
      n_parasitized_predicted, predicted_fraction, accuracy (of the cells of the slide) and
      infected (the truth: the slide has at least one parasitized cell).
    """
    labels, probs, slide_ids = _check_slides(labels, probs, slide_ids)
    predicted = (probs >= threshold).astype(np.int64)
    rows = []
    for slide in np.unique(slide_ids):
        if slide == "":
            continue
        mask = slide_ids == slide
        n_cells = int(mask.sum())
        n_true = int(labels[mask].sum())
        n_pred = int(predicted[mask].sum())
        rows.append(
            {
                "slide_id": str(slide),
                "n_cells": n_cells,
                "n_parasitized_true": n_true,
                "true_fraction": n_true / n_cells,
                "n_parasitized_predicted": n_pred,
                "predicted_fraction": n_pred / n_cells,
                "accuracy": float(np.mean(labels[mask] == predicted[mask])),
                "infected": n_true > 0,
            }
        )
    return rows


def _known_slides(labels, probs, slide_ids, threshold):
    rows = slide_table(labels, probs, slide_ids, threshold)
    if not rows:
        raise ValueError("patient-level metrics need slide ids; every slide id is unknown ('')")
    infected = np.array([r["infected"] for r in rows], dtype=np.int64)
    fractions = np.array([r["predicted_fraction"] for r in rows], dtype=np.float64)
    return rows, infected, fractions


def _balanced_score(infected, called):
    """Balanced accuracy of decisions; the mean of the defined rates if a class is absent."""
    rates = []
    if np.any(infected == 1):
        rates.append(np.mean(called[infected == 1] == 1))
    if np.any(infected == 0):
        rates.append(np.mean(called[infected == 0] == 0))
    return float(np.mean(rates))


def choose_fraction_threshold(
    labels: ArrayLike, probs: ArrayLike, slide_ids: Iterable[str | bytes], threshold: float = 0.5
) -> float:
    """Chooses t for the patient rule "infected iff fraction of cells called parasitized > t".

    Run it on the validation split, then apply ``patient_metrics(..., fraction_threshold=t)`` to
    the test split. t lives in [0, 1), so a slide with no cell called parasitized is always
    uninfected and one with every cell called parasitized is always infected. The decisions only
    change where t crosses an observed fraction, so [0, 1) splits into intervals of equal
    decisions; t is the midpoint of the widest run of adjacent intervals that maximises the
    balanced accuracy of the patient decisions (the mean of the defined rates if all validation
    patients share a class). Equal widths go to the lowest run, which favours sensitivity.

    Returns:
      t, a float in [0, 1).
    """
    _, infected, fractions = _known_slides(labels, probs, slide_ids, threshold)
    edges = np.unique(np.r_[0.0, fractions[(fractions > 0.0) & (fractions < 1.0)], 1.0])
    # Interval i is [edges[i], edges[i + 1]); any t in it makes the same decisions as edges[i].
    scores = np.array(
        [_balanced_score(infected, (fractions > t).astype(np.int64)) for t in edges[:-1]]
    )
    best = np.isclose(scores, scores.max(), rtol=0.0, atol=1e-12)
    runs, start = [], None
    for i, is_best in enumerate(np.r_[best, False]):
        if is_best and start is None:
            start = i
        elif not is_best and start is not None:
            runs.append((edges[i] - edges[start], -edges[start], edges[start], edges[i]))
            start = None
    _, _, low, high = max(runs)
    return float((low + high) / 2.0)


def patient_metrics(
    labels: ArrayLike,
    probs: ArrayLike,
    slide_ids: Iterable[str | bytes],
    fraction_threshold: float,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Patient-level metrics: each slide is one patient, called infected iff its fraction of cells
    called parasitized (at ``threshold``) exceeds ``fraction_threshold``.

    Cells with an unknown slide id ('') are left out; raises ValueError if no slide id is known.

    Returns:
      dict with n_patients, n_infected, n_uninfected, accuracy, balanced_accuracy, sensitivity,
      specificity, confusion_matrix ``[[tn, fp], [fn, tp]]`` of patients, auc (of the predicted
      fraction as a score for infection; None if one class is absent), fraction_threshold,
      threshold, per_slide_accuracy {min, median, max} of cell accuracy within a slide, slides
      (``slide_table`` rows plus predicted_infected and correct) and errors (misclassified slide
      ids).
    """
    rows, infected, fractions = _known_slides(labels, probs, slide_ids, threshold)
    called = (fractions > fraction_threshold).astype(np.int64)
    tn, fp, fn, tp = _confusion(infected, called)
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    for row, c in zip(rows, called, strict=True):
        row["predicted_infected"] = bool(c)
        row["correct"] = bool(c) == row["infected"]
    slide_accuracy = np.array([r["accuracy"] for r in rows])
    return {
        "n_patients": len(rows),
        "n_infected": tp + fn,
        "n_uninfected": tn + fp,
        "accuracy": (tp + tn) / len(rows),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "auc": _auc(infected, fractions),
        "fraction_threshold": float(fraction_threshold),
        "threshold": float(threshold),
        "per_slide_accuracy": {
            "min": float(slide_accuracy.min()),
            "median": float(np.median(slide_accuracy)),
            "max": float(slide_accuracy.max()),
        },
        "slides": rows,
        "errors": [r["slide_id"] for r in rows if not r["correct"]],
    }
