"""report.json / report.md and the plots of a run (metrics are computed in mnres.metrics).

Plots use matplotlib's object API (``Figure``, rendered by the Agg canvas): no pyplot state, no
window, safe on headless machines and in threads.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from mnres import run_folder
from mnres.evaluation import metrics

# File names in the workdir (owned by mnres.run_folder); report.md links every PNG present when
# it is written.
REPORT_JSON = run_folder.REPORT_JSON
REPORT_MD = run_folder.REPORT_MD
METRICS_JSONL = run_folder.METRICS_JSONL
HISTORY_PNG = run_folder.HISTORY_PNG
CONFUSION_MATRIX_PNG = run_folder.CONFUSION_MATRIX_PNG
ROC_PNG = run_folder.ROC_PNG
RELIABILITY_PNG = "reliability.png"

_CELL_ROWS = [
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall (sensitivity)"),
    ("specificity", "Specificity"),
    ("f1", "F1"),
    ("mcc", "MCC"),
    ("auc", "ROC AUC"),
    ("ece", "ECE"),
    ("loss", "Loss"),
    ("n", "Cells"),
]
_PATIENT_ROWS = [
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("auc", "ROC AUC (fraction as score)"),
    ("n_patients", "Patients"),
    ("n_infected", "Infected patients"),
    ("fraction_threshold", "Fraction threshold (from validation)"),
]


# The 0.1 name of the conversion every JSON file of a run goes through.
_to_json = run_folder.to_json_types


def _fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _metric_table(sections, rows):
    """A metric x split table over the sections present (e.g. validation, test)."""
    names = [name for name in sections if sections[name]]
    body = [
        [label] + [sections[name].get(key) for name in names]
        for key, label in rows
        if any(key in sections[name] for name in names)
    ]
    return _table(["Metric"] + names, body)


def _confusion_table(cm, unit):
    (tn, fp), (fn, tp) = cm
    return _table(
        [f"{unit}: true / predicted", "uninfected", "parasitized"],
        [["uninfected", tn, fp], ["parasitized", fn, tp]],
    )


def _markdown(report, pngs):
    """report.md: the sections of `report` present, then links to the plots `pngs`."""
    lines = ["# Report", ""]
    config = report.get("config") or {}
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and model.get("name"):
        lines += [
            f"Model: `{model['name']}`" + (f", alpha {model['alpha']}" if "alpha" in model else ""),
            "",
        ]
    # A model that did not learn says so first, before any figure is read.
    lines += [f"> **Warning:** {w}\n" for w in report.get("warnings") or []]
    lines += _cell_section(report) + _patient_section(report) + _calibration_section(report)
    for section in ("data", "training", "timing"):
        # Flat key/value sections only; nested ones stay in report.json.
        items = report.get(section)
        if isinstance(items, dict) and items:
            rows = [
                [k, f"{v:g}" if isinstance(v, float) else v]
                for k, v in items.items()
                if not isinstance(v, dict | list)
            ]
            lines += [f"## {section.capitalize()}", ""] + _table(["", "value"], rows) + [""]
    lines += _provenance_section(report.get("provenance"))
    if pngs:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})\n" for p in pngs] + [""]
    return "\n".join(lines)


def _provenance_section(provenance):
    """What produced the figures: versions, commit, devices, CPU (the rest is in report.json)."""
    if not isinstance(provenance, dict):
        return []
    versions = provenance.get("versions") or {}
    git = provenance.get("git") or {}
    devices = provenance.get("devices") or {}
    cpu = provenance.get("cpu") or {}
    commit = git.get("commit")
    rows = [
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)],
        ["commit", f"{commit}{' (uncommitted changes)' if git.get('dirty') else ''}" if commit
         else "not a git checkout"],
        ["devices", f"{devices.get('count')} x {devices.get('kind')} ({devices.get('platform')})"],
        ["CPU", f"{cpu.get('model')}; {' '.join(cpu.get('vector_flags') or [])}"],
        ["XLA_FLAGS", provenance.get("xla_flags") or "(none)"],
        ["manifest sha256", provenance.get("manifest_sha256")],
    ]  # fmt: skip
    return ["## Provenance", ""] + _table(["", "value"], rows) + [""]


def _cell_section(report):
    test = report.get("test") or {}
    cells = {"validation": report.get("validation"), "test": test}
    if not any(cells.values()):
        return []
    threshold = test.get("threshold", (report.get("validation") or {}).get("threshold"))
    lines = ["## Cell level", ""]
    if threshold is not None:
        lines += [f"A cell is called parasitized iff P(parasitized) >= {threshold}.", ""]
    lines += _metric_table(cells, _CELL_ROWS) + [""]
    if test.get("confusion_matrix"):
        lines += ["Test confusion matrix (cells):", ""]
        lines += _confusion_table(test["confusion_matrix"], "cells") + [""]
    return lines


def _patient_section(report):
    patients = {"validation": report.get("validation_patient"), "test": report.get("test_patient")}
    if not any(patients.values()):
        return []
    test_patient = patients["test"] or {}
    lines = ["## Patient level", ""]
    lines += [
        "Each slide is one patient, infected iff it holds a parasitized cell; a patient is "
        "called infected iff the fraction of its cells called parasitized exceeds the "
        "fraction threshold, chosen on the validation split.",
        "",
    ]
    lines += _metric_table(patients, _PATIENT_ROWS) + [""]
    if test_patient.get("confusion_matrix"):
        lines += _confusion_table(test_patient["confusion_matrix"], "patients") + [""]
    if test_patient.get("per_slide_accuracy"):
        acc = test_patient["per_slide_accuracy"]
        lines += [
            f"Per-slide cell accuracy (test): min {_fmt(acc['min'])}, median "
            f"{_fmt(acc['median'])}, max {_fmt(acc['max'])}.",
            "",
        ]
    if test_patient.get("errors") is not None:
        errors = ", ".join(f"`{e}`" for e in test_patient["errors"]) or "none"
        lines += [f"Misclassified patients (test): {errors}.", ""]
    if test_patient.get("slides"):
        lines += ["### Test slides", ""]
        lines += _table(
            ["Slide", "Cells", "True fraction", "Predicted fraction", "Accuracy", "Infected",
             "Called infected"],
            [
                [s["slide_id"], s["n_cells"], s["true_fraction"], s["predicted_fraction"],
                 s["accuracy"], s["infected"], s.get("predicted_infected")]
                for s in test_patient["slides"]
            ],
        )  # fmt: skip
        lines += [""]
    return lines


def _calibration_section(report):
    calibrated = report.get("calibration")
    if not calibrated:
        return []
    lines = [
        "## Calibration and operating points",
        "",
        f"Temperature {_fmt(calibrated['temperature'])} (fitted on validation); test ECE "
        f"{_fmt(calibrated['ece_before'])} before scaling, {_fmt(calibrated['ece_after'])} "
        "after. Thresholds on P(parasitized) chosen for 95% and 98% validation "
        "specificity, and what they reach on test (`calibration.json`; "
        "`python -m mnres predict RUN ... --operating-point spec95`):",
        "",
    ]
    lines += _table(
        ["Operating point", "Threshold", "Test sensitivity", "Test specificity"],
        [
            [f"spec {p}%", calibrated[f"threshold_at_spec_{p}"],
             calibrated[f"sensitivity_at_spec_{p}"], calibrated[f"specificity_at_spec_{p}"]]
            for p in (95, 98)
        ],
    )  # fmt: skip
    return lines + [""]


def write_report(workdir: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Writes ``report.json`` (the dict, as plain JSON) and a readable ``report.md`` to workdir.

    Args:
      workdir: the run directory; created if missing.
      report: nested dict, e.g. {'test': metrics.binary_metrics(...), 'test_patient':
        metrics.patient_metrics(...), 'validation': ..., 'validation_patient': ..., 'config':
        ..., 'timing': {...}}; every key is optional. Numpy values and ConfigDicts are
        converted; non-finite floats become null. report.md links the PNGs already in workdir,
        so write the plots first.
    """
    os.makedirs(workdir, exist_ok=True)
    report = run_folder.to_json_types(report)
    run_folder.write_report(workdir, report, _markdown(report, run_folder.plot_files(workdir)))


# Rows of metrics.jsonl (0.1 name; the run folder reads them).
read_history = run_folder.read_history


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Accuracy and loss against epoch, train and validation (the paper's Fig. 2)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, quantity, title in zip(
        fig.subplots(1, 2), ("accuracy", "loss"), ("Accuracy", "Loss"), strict=True
    ):
        for split, style in (("train", "-o"), ("val", "-s")):
            points = [
                (row["epoch"], row[f"{split}_{quantity}"])
                for row in history
                if row.get(f"{split}_{quantity}") is not None and "epoch" in row
            ]
            if points:
                epochs, values = zip(*points, strict=True)
                label = "train" if split == "train" else "validation"
                ax.plot(epochs, values, style, markersize=3, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=quantity)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    _save(fig, path)


def plot_confusion_matrix(
    cm: ArrayLike,
    path: str | os.PathLike[str],
    class_names: Sequence[str] = ("uninfected", "parasitized"),
) -> None:
    """Counts and row percentages (the share of each true class), the paper's Fig. 3."""
    cm = np.asarray(cm, dtype=np.int64)
    row_sums = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0)
    fig = Figure(figsize=(4.5, 4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    for (i, j), count in np.ndenumerate(cm):
        color = "white" if shares[i, j] > 0.5 else "black"
        ax.text(j, i, f"{count}\n{shares[i, j]:.1%}", ha="center", va="center", color=color)
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title="Confusion matrix")
    ax.set_xticklabels(class_names)
    ax.set_yticklabels(class_names)
    _save(fig, path)


def plot_roc(
    labels: ArrayLike, probs: ArrayLike, path: str | os.PathLike[str], threshold: float = 0.5
) -> None:
    """The ROC curve with its AUC in the legend and the operating point at ``threshold``."""
    fpr, tpr, _ = metrics.roc_curve(labels, probs)
    at = metrics.binary_metrics(labels, probs, threshold)
    auc = at["auc"]
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    if auc is not None:
        ax.plot(fpr, tpr, label=f"ROC (AUC = {auc:.4f})")
        ax.plot(1 - at["specificity"], at["sensitivity"], "o", color="C3",
                label=f"threshold {threshold}")  # fmt: skip
    else:
        ax.text(0.5, 0.5, "ROC undefined: one class absent", ha="center", va="center")
    ax.set(
        xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)", title="ROC, parasitized vs uninfected",
    )  # fmt: skip
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_reliability(
    labels: ArrayLike, probs: ArrayLike, path: str | os.PathLike[str], n_bins: int = 15
) -> None:
    """Reliability diagram: accuracy against confidence per bin, counts below, ECE in the title."""
    bins = metrics.calibration_bins(labels, probs, n_bins)
    ece = metrics.expected_calibration_error(labels, probs, n_bins)
    lower, upper = np.array(bins["lower"]), np.array(bins["upper"])
    occupied = np.array(bins["count"]) > 0
    fig = Figure(figsize=(4.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    width = upper - lower
    accuracy = np.array([a if a is not None else 0.0 for a in bins["accuracy"]])
    top.bar(lower[occupied], accuracy[occupied], width[occupied], align="edge",
            edgecolor="black", label="accuracy")  # fmt: skip
    top.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    top.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE = {ece:.4f})")
    top.legend(loc="upper left")
    bottom.bar(lower, bins["count"], width, align="edge", color="gray", edgecolor="black")
    bottom.set(xlabel="confidence of the called class", ylabel="cells", yscale="symlog")
    # Two classes: confidence is at least 0.5, so the lower bins are always empty.
    bottom.set_xlim(lower[occupied].min() if occupied.any() else 0.0, 1.0)
    _save(fig, path)


def plot_slide_fractions(
    slides: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "Per-slide fraction of cells called parasitized",
) -> None:
    """Predicted against true fraction of parasitized crops per slide, one point per patient.

    The fractions are of the curated crops of a slide, not clinical parasitemia. Points are
    coloured by the patient's truth and sized by the number of crops; a black ring marks a
    patient whose infected/uninfected call (``predicted_infected``, when present) is wrong.

    Args:
      slides: ``metrics.slide_table`` or ``metrics.patient_metrics(...)['slides']`` rows
        (slide_id, n_cells, true_fraction, predicted_fraction, infected[, predicted_infected]).
      path: the PNG to write.
      title: the figure title; the mean absolute fraction error is appended.
    """
    true = np.array([s["true_fraction"] for s in slides], dtype=np.float64)
    predicted = np.array([s["predicted_fraction"] for s in slides], dtype=np.float64)
    infected = np.array([bool(s["infected"]) for s in slides])
    sizes = 12 + 4 * np.sqrt([s["n_cells"] for s in slides])
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="gray", label="predicted = true")
    for is_infected, color, label in ((True, "C3", "infected"), (False, "C0", "uninfected")):
        mask = infected == is_infected
        if mask.any():
            ax.scatter(true[mask], predicted[mask], s=sizes[mask], color=color, alpha=0.6,
                       edgecolor="none", label=f"{label} patients ({int(mask.sum())})")  # fmt: skip
    called = [s.get("predicted_infected") for s in slides]
    if slides and all(c is not None for c in called):
        wrong = np.array(called, dtype=bool) != infected
        if wrong.any():
            ax.scatter(true[wrong], predicted[wrong], s=sizes[wrong] * 2.5, facecolor="none",
                       edgecolor="black", linewidth=1.2,
                       label=f"wrong patient call ({int(wrong.sum())})")  # fmt: skip
    error = float(np.mean(np.abs(predicted - true))) if slides else math.nan
    ax.set(
        xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="true fraction of parasitized crops",
        ylabel="fraction of crops called parasitized",
        title=f"{title}\nmean |predicted - true| = {error:.3f}",
    )  # fmt: skip
    ax.title.set_fontsize(9)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
