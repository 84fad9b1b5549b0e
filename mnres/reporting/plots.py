"""The plots of a run: history, confusion matrix, ROC, reliability, per-slide fractions.

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

from mnres import atomic_file, metrics
from mnres.metrics import multiclass


def save(fig, path, dpi: int = 120) -> None:
    """Writes `fig` to `path` whole or not at all (`mnres.atomic_file`), in its suffix's format."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file.writing(path, binary=True) as f:
        fig.savefig(f, dpi=dpi, format=os.path.splitext(path)[1][1:] or "png")


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
    save(fig, path)


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
    save(fig, path)


def plot_roc(
    labels: ArrayLike,
    probs: ArrayLike,
    path: str | os.PathLike[str],
    threshold: float = 0.5,
    class_names: Sequence[str] = ("uninfected", "parasitized"),
) -> None:
    """The ROC curve with its AUC in the legend and the operating point at ``threshold``.

    Two classes: ``probs`` is P(class 1), the positive class ``class_names[1]``.
    """
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
        ylabel="true positive rate (sensitivity)",
        title=f"ROC, {class_names[1]} vs {class_names[0]}",
    )  # fmt: skip
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save(fig, path)


def plot_reliability(
    labels: ArrayLike, probs: ArrayLike, path: str | os.PathLike[str], n_bins: int = 15
) -> None:
    """Reliability diagram: accuracy against confidence per bin, counts below, ECE in the title.

    `probs` is P(class 1) [N] for two classes, or the softmax rows [N, K] for K classes.
    """
    by = multiclass if np.ndim(probs) == 2 else metrics
    bins = by.calibration_bins(labels, probs, n_bins)
    ece = by.expected_calibration_error(labels, probs, n_bins)
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
    # Confidence is at least 1 / K (0.5 for two classes): the lower bins are always empty.
    bottom.set_xlim(lower[occupied].min() if occupied.any() else 0.0, 1.0)
    save(fig, path)


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
    save(fig, path)
