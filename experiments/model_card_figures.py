"""The figures the shipped model's card computes from committed records.

Wilson intervals for proportions of patients; bootstrap intervals over patients for cell-level
figures (the crops of one patient are not independent), from per-crop outputs or, where only
each slide's counts were kept, from those; mean +/- SD over cross-validation folds. Seeded and
rounded, so a regenerated card compares equal.
"""

from __future__ import annotations

import numpy as np

from mnres.metrics.intervals import patient_bootstrap, wilson_interval

# Seeded, so a regenerated card has the same intervals.
BOOTSTRAP = {"resamples": 2000, "seed": 0}
CELL_KEYS = ("accuracy", "auc", "sensitivity", "specificity")
CONVENTIONS = (
    "Spreads are mean +/- SD over folds or seeds; proportions of patients have Wilson 95% "
    "intervals; cell-level figures have 95% bootstrap intervals over patients (slides "
    f"resampled with replacement, {BOOTSTRAP['resamples']:,} times, seed {BOOTSTRAP['seed']}, "
    "within infected and within uninfected patients), because the crops of one patient are not "
    "independent."
)
NO_TEST_AUC_INTERVAL = (
    "The report keeps each test slide's counts, not its crops' scores: the bootstrap gives "
    "accuracy, sensitivity and specificity (exact from the counts), not AUC."
)
NO_INDEPENDENT_CELL_INTERVAL = (
    "No interval on the cell figures: the evaluation returned pooled figures, without a "
    "per-patient breakdown to resample."
)


def _round(x: float) -> float:
    # Computed figures are rounded so that a regenerated card compares equal across machines.
    return round(float(x), 6)


def wilson(k: int, n: int) -> dict:
    """k of n, its share and Wilson 95% interval (the form `model_card_sections.share` prints)."""
    low, high = wilson_interval(int(k), int(n))
    return {"k": int(k), "n": int(n), "value": _round(k / n), "low": _round(low),
            "high": _round(high)}  # fmt: skip


def _percentiles(interval) -> list[float]:
    return [_round(interval[0]), _round(interval[1])]


def slide_bootstrap(probs, labels, slide_ids, threshold: float = 0.5) -> dict:
    """95% intervals of the cell figures at p >= threshold, resampling slides (patients)."""
    from mnres.metrics import cells

    probs, labels, slide_ids = np.asarray(probs), np.asarray(labels), np.asarray(slide_ids)
    rows = [np.flatnonzero(slide_ids == s) for s in sorted(set(slide_ids.tolist()))]

    def statistic(pick):
        index = np.concatenate([rows[i] for i in pick])
        metrics = cells.binary_metrics(labels[index], probs[index], threshold)
        return {k: metrics[k] for k in CELL_KEYS}

    infected = np.array([labels[r].any() for r in rows])
    found = patient_bootstrap(statistic, infected, **BOOTSTRAP)
    return {k: _percentiles(v) for k, v in found.items()}


def slide_counts(patient_metrics: dict) -> dict[str, np.ndarray]:
    """Each slide's crops (n), parasitized crops (pos), right calls (correct) and true positives
    (tp), from a report's per-slide counts."""
    slides = patient_metrics["slides"]
    n = np.array([s["n_cells"] for s in slides])
    pos = np.array([s["n_parasitized_true"] for s in slides])
    correct = np.array([round(s["accuracy"] * s["n_cells"]) for s in slides])
    # correct = tp + tn and called = tp + fp, so tp = (correct - n + pos + called) / 2.
    tp = (correct - n + pos + np.array([s["n_parasitized_predicted"] for s in slides])) // 2
    infected = np.array([bool(s["infected"]) for s in slides])
    return {"n": n, "pos": pos, "correct": correct, "tp": tp, "infected": infected}


def count_bootstrap(patient_metrics: dict) -> dict:
    """The same intervals from each slide's counts (no per-crop scores: no AUC)."""
    c = slide_counts(patient_metrics)
    n, pos, correct, tp = c["n"], c["pos"], c["correct"], c["tp"]
    tn, neg = correct - tp, n - pos

    def statistic(pick):
        w = np.bincount(pick, minlength=len(n))
        return {"accuracy": w @ correct / (w @ n), "sensitivity": w @ tp / (w @ pos),
                "specificity": w @ tn / (w @ neg)}  # fmt: skip

    found = patient_bootstrap(statistic, c["infected"], **BOOTSTRAP)
    return {"accuracy": _percentiles(found["accuracy"]), "auc": None,
            "sensitivity": _percentiles(found["sensitivity"]),
            "specificity": _percentiles(found["specificity"])}  # fmt: skip


def intervals(report: dict, calibration: dict, validation_outputs: dict | None) -> dict:
    """The bootstrap intervals of the validation and test cell figures, with and without the
    slide prior ('prior' and 'plain'), and of the validation figures at the operating points.

    Raises:
      ValueError: validation outputs that do not give back the report's validation accuracy
        (another model's).
    """
    from mnres.metrics import cells, verdict_fitting

    prior = report.get("slide_prior") or {}
    applied = bool(prior.get("applied"))
    out = {"conventions": CONVENTIONS, "bootstrap": dict(BOOTSTRAP), "validation": None,
           "test": {}, "test_auc": NO_TEST_AUC_INTERVAL}  # fmt: skip
    if report.get("test_patient"):
        out["test"]["prior" if applied else "plain"] = count_bootstrap(report["test_patient"])
    if applied and prior["without"]["test_patient"]:
        out["test"]["plain"] = count_bootstrap(prior["without"]["test_patient"])
    if validation_outputs is None:
        return out
    v = validation_outputs  # P as `predict` gives it, without the slide prior
    plain = prior["without"]["validation"] if applied else report["validation"]
    got = cells.binary_metrics(v["label"], v["prob"])["accuracy"]
    if abs(got - plain["accuracy"]) > 1e-9:
        raise ValueError(f"validation outputs give accuracy {got:.6f}, the report "
                         f"{plain['accuracy']:.6f}: another model's outputs (remove them and "
                         "run `python -m experiments.verdict_cv ship`)")  # fmt: skip
    out["validation"] = {"plain": slide_bootstrap(v["prob"], v["label"], v["slide_id"])}
    if applied:
        moved = verdict_fitting.with_prior(v["prob"], v["slide_id"], prior["train_prevalence"])
        out["validation"]["prior"] = slide_bootstrap(moved, v["label"], v["slide_id"])
    # The operating points are thresholds on the plain P.
    for name in ("threshold_at_spec_95", "threshold_at_spec_98"):
        if calibration.get(name) is not None:
            out["validation"][name] = slide_bootstrap(
                v["prob"], v["label"], v["slide_id"], calibration[name]
            )
    return out


def cross_validation(tests: dict | None, search: str | None) -> dict | None:
    """Mean +/- SD over the recipe's test folds (`experiments.search.records.read_test`) of the
    search folder `search` (relative to the repository)."""
    if not tests:
        return None
    folds = [tests[k] for k in sorted(tests)]
    out = {
        "recipe": folds[0]["recipe"],
        "folds": len(folds),
        "test_crops": [f["cell"]["n"] for f in folds],
        "test_patients": [f["patients"]["n_patients"] for f in folds],
        "command": f"python -m experiments.ablation --search={search} --test",
    }
    for k in CELL_KEYS:
        values = np.array([f["cell"][k] for f in folds], np.float64)
        out[k] = {"mean": _round(values.mean()), "sd": _round(values.std(ddof=1)),
                  "per_fold": values.tolist()}  # fmt: skip
    return out


def independent(record: dict | None) -> dict | None:
    """The maintainers' record (`experiments.independent_evaluation.shipped()`), with Wilson
    intervals on its patient counts."""
    if record is None:
        return None
    keep = ("what", "weights_sha256", "weights_commit", "evaluated_by", "reported", "command",
            "hardware", "versions", "patients", "cells", "patient_rule", "counts_note")  # fmt: skip
    runs = [dict(run, patients_right_wilson=wilson(run["patients_right"], record["patients"]["n"]))
            for run in record["runs"]]  # fmt: skip
    return {**{k: record.get(k) for k in keep}, "runs": runs,
            "cell_intervals": NO_INDEPENDENT_CELL_INTERVAL}  # fmt: skip
