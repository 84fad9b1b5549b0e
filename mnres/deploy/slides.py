"""Crops grouped into slides, and each slide's verdict under the rule stored with the model.

A slide is one patient's smear. `group` gives each predicted crop a slide: the NIH slide id its
file name carries ('C100P61ThinF_IMG_..._cell_165.png' -> 'C100P61'), else the nearest folder
above it that is not a class folder (`Parasitized/`, `Uninfected/`, any case), so a user's own
slides are folders of crops with any file names.

The verdict rule is data of the model: `verdict_rule.json` in a run folder or a shipped model's
folder (beside an exported file, or one folder up), written by
`mnres.metrics.verdict_fitting.rule_record`. It names the `mnres.metrics.verdicts.VerdictRule`,
whether it reads the plain P(parasitized) or the slide-prior-adjusted one, and what it was
fitted on. A model without one gets the per-slide
counts and no verdict.
"""

from __future__ import annotations

import os

import numpy as np

from mnres import run_folder
from mnres.data.folders import CLASS_FOLDERS, crop_facts
from mnres.metrics import verdict_fitting, verdicts

GROUP_BY = ("auto", "name", "folder", "none")


def folder_slide(path: str) -> str:
    """The nearest folder above a crop that is not a class folder, as given ('.' for none).

    'smears/patient_7/Parasitized/a.png' -> 'smears/patient_7'; 'a.png' -> '.'.
    """
    folder = os.path.dirname(os.path.normpath(path))
    while folder and os.path.basename(folder).lower() in CLASS_FOLDERS:
        folder = os.path.dirname(folder)
    return folder or "."


def group(rows: list[dict], how: str = "auto") -> None:
    """Sets each row's slide_id: by NIH file name, by folder, both ('auto': the name's id when
    it has one, else the folder) or none ('')."""
    if how not in GROUP_BY:
        raise ValueError(f"--group-by must be one of {', '.join(GROUP_BY)}, got {how!r}")
    for row in rows:
        by_name = crop_facts(row["file"]).slide_id if how in ("auto", "name") else ""
        by_folder = folder_slide(row["file"]) if how in ("auto", "folder") else ""
        row["slide_id"] = by_name or by_folder


def load_rule(model_path: str) -> dict | None:
    """The model's stored rule record (`run_folder.VERDICT_RULE_JSON`), or None when it has none."""
    from mnres.deploy.predict import _run_folders

    for folder in _run_folders(model_path):
        path = os.path.join(folder, run_folder.VERDICT_RULE_JSON)
        if os.path.isfile(path):
            record = run_folder.read_json(path)
            verdicts.VerdictRule.from_dict(record["rule"])  # a broken rule fails here, loudly
            if record.get("scores") not in verdict_fitting.SCORES:
                raise ValueError(f"{path}: scores must be one of {verdict_fitting.SCORES}")
            return record
    return None


def slide_rows(rows: list[dict], record: dict | None, threshold: float = 0.5) -> list[dict]:
    """Per slide (rows with a slide id, read, of the malaria pair): the counts and the verdict.

    Without a rule record each slide has slide_id, cells, called (p >= threshold), the called
    fraction, the mean p and verdict None. With one, the `slide_verdicts` fields (confident
    crops, the Rogan-Gladen estimate and its interval, the p-value of a binomial rule, the
    verdict), counted on the scores the rule reads, and for an insufficient slide the reason.
    """
    scored = [r for r in rows if r["slide_id"] and r["error"] is None
              and r.get("prob_parasitized") is not None]  # fmt: skip
    if not scored:
        return []
    probs = np.array([r["prob_parasitized"] for r in scored], np.float64)
    ids = np.array([r["slide_id"] for r in scored])
    if record is None:
        out = []
        for slide in np.unique(ids):
            p = probs[ids == slide]
            called = int(np.sum(p >= threshold))
            out.append({"slide_id": str(slide), "cells": int(p.size), "called": called,
                        "called_fraction": called / p.size, "mean_prob": float(p.mean()),
                        "verdict": None})  # fmt: skip
        return out
    if record["scores"] == "prior":
        probs = verdict_fitting.with_prior(probs, ids, record["train_prevalence"])
    rule = verdicts.VerdictRule.from_dict(record["rule"])
    out = verdicts.slide_verdicts(probs, ids, rule, cell_threshold=threshold)
    for row in out:
        row["mean_prob"] = float(probs[ids == row["slide_id"]].mean())
        if row["verdict"] == "insufficient":
            row["reason"] = (f"{row['cells']} crop(s) read; the rule needs {rule.min_cells} or "
                             "more from one slide")  # fmt: skip
    return out


def describe(record: dict) -> str:
    """The rule in one line, as predict prints it."""
    rule = verdicts.VerdictRule.from_dict(record["rule"])
    fpr = record["false_positive_rate"]
    if rule.kind == "binomial":
        healthy = 100 * rule.false_positive_rate
        how = (f"a binomial test (alpha {rule.alpha:g}) finds more of its crops with p >= "
               f"{rule.q:g} than a healthy slide's {healthy:.2f}%")  # fmt: skip
    elif rule.kind == "count":
        how = f"{rule.k} or more of its crops have p >= {rule.q:g}"
    else:
        how = f"more than {100 * rule.threshold:.1f}% of its crops have p >= {rule.q:g}"
    scores = "p moved by the slide prior" if record["scores"] == "prior" else "p as shown"
    measured = 100 * fpr["false_positive_rate"]
    return (f"infected iff {how} ({scores}); fewer than {rule.min_cells} crops: insufficient. "
            f"Healthy validation crops over {rule.q:g}: {measured:.2f}% "
            f"(95% CI {100 * fpr['low']:.2f}-{100 * fpr['high']:.2f}%, "
            f"{fpr['crops']} crops)")  # fmt: skip


def format_slides(slides: list[dict]) -> list[str]:
    """The per-slide table's lines: a row for each slide with enough crops for a verdict, and
    one line for the insufficient ones (`--json` lists every slide)."""
    from mnres.deploy.crops import printable

    if not slides:
        return []
    width = max([5] + [len(printable(s["slide_id"])) for s in slides])
    if slides[0]["verdict"] is None:
        lines = [f"{'slide':<{width}} {'cells':>6} {'called':>7} {'fraction':>9} {'mean p':>7}"]
        lines += [
            f"{printable(s['slide_id']):<{width}} {s['cells']:>6} {s['called']:>7} "
            f"{s['called_fraction']:>9.3f} {s['mean_prob']:>7.3f}"
            for s in slides
        ]
        return lines + ["no verdicts: the model has no verdict rule (verdict_rule.json)"]
    shown = [s for s in slides if s["verdict"] != "insufficient"]
    lines = []
    if shown:
        lines.append(f"{'slide':<{width}} {'cells':>6} {'called':>7} {'confident':>9} "
                     f"{'estimate [95% CI]':>22}  verdict")  # fmt: skip
    for s in shown:
        estimate = f"{s['estimate']:.3f} [{s['estimate_low']:.3f}, {s['estimate_high']:.3f}]"
        lines.append(f"{printable(s['slide_id']):<{width}} {s['cells']:>6} {s['called']:>7} "
                     f"{s['confident']:>9} {estimate:>22}  {s['verdict']}")  # fmt: skip
    short = [s for s in slides if s["verdict"] == "insufficient"]
    if short:
        most = max(s["cells"] for s in short)
        need = short[0]["reason"].split("needs ")[1].split(" ")[0]
        lines.append(f"{len(short)} slide(s) insufficient, no verdict: {most} crop(s) at most, "
                     f"the rule needs {need} or more from one slide")  # fmt: skip
    return lines
