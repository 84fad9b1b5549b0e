"""The slide verdict protocol's tables and the model card's summary, from its records.

`python -m experiments.verdict_cv table` prints them; `python -m experiments.docs_tables` writes
them into docs/results.md, and `experiments.package_model` puts `chosen_summary` on the card.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mnres.metrics import verdicts

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The first search's records, `experiments.verdict_cv`'s default (--results for others); the
# shipped model's are the ones ORIGIN_JSON names.
RESULTS = os.path.join(_REPO, "experiments", "results", "verdicts")
# Which recipe search and slide-verdict records stand behind the shipped model: a model from
# another search ships by editing this record, and only it.
ORIGIN_JSON = os.path.join(_REPO, "experiments", "results", "malaria_model", "origin.json")


def shipped_origin() -> dict:
    """ORIGIN_JSON's `search` and `verdicts` folders, absolute; `search_folder` as it names it."""
    with open(ORIGIN_JSON) as f:
        record = json.load(f)
    return {"search": os.path.join(_REPO, record["search"]), "search_folder": record["search"],
            "verdicts": os.path.join(_REPO, record["verdicts"])}  # fmt: skip


def _share(s: dict) -> str:
    return (
        f"{100 * s['value']:.1f}% ({s['k']}/{s['n']}; {100 * s['low']:.1f}-{100 * s['high']:.1f})"
    )


BINS = ((0.0, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 1.0))
SLIDE_SIZES = (50, 500, 5000)


def chosen_summary(results: str) -> dict:
    """The chosen pair's pooled test figures and detection curve, for the model card."""
    with open(os.path.join(results, "test_folds.json")) as f:
        record = json.load(f)
    chosen = record["chosen"]
    entry = record["pairs"][f"{chosen['candidate']}/{chosen['scores']}"]
    fractions = record["parasitized_fraction"]
    detection = []
    for low, high in BINS:
        slides = [s for s, v in fractions.items() if low < v <= high]
        caught = sum(entry["calls"][s] for s in slides)
        detection.append({"low": low, "high": high, "patients": len(slides), "caught": caught})
    pooled = {k: entry["pooled"][k] for k in ("sensitivity", "specificity", "accuracy")}
    return {"chosen": chosen, "patients": pooled, "detection": detection,
            "recipes": record["protocol"]["recipes"],
            "command": "python -m experiments.verdict_cv test"}  # fmt: skip


def table_markdown(results: str = RESULTS) -> str:
    """The CV table, the detection curve and the slide-size table, as docs/results.md has them."""
    with open(os.path.join(results, "choice.json")) as f:
        choice = json.load(f)
    lines = ["| rule | scores | validation patients, each left out: sensitivity | specificity "
             "| balanced accuracy |", "|---|---|---|---|---|"]  # fmt: skip
    for row in choice["leave_one_patient_out"]:
        mark = " (chosen)" if {"candidate": row["candidate"], "scores": row["scores"]} == choice[
            "chosen"] else ""  # fmt: skip
        lines.append(f"| {row['candidate']}{mark} | {row['scores']} | "
                     f"{_share(row['sensitivity'])} | {_share(row['specificity'])} | "
                     f"{100 * row['balanced_accuracy']:.1f}% |")  # fmt: skip
    with open(os.path.join(results, "test_folds.json")) as f:
        record = json.load(f)
    chosen = f"{record['chosen']['candidate']}/{record['chosen']['scores']}"
    lines += ["", "| rule | scores | test patients: sensitivity | specificity | accuracy |",
              "|---|---|---|---|---|"]  # fmt: skip
    for pair, entry in record["pairs"].items():
        p = entry["pooled"]
        mark = " (chosen)" if pair == chosen else ""
        candidate, which = pair.split("/")
        lines.append(f"| {candidate}{mark} | {which} | {_share(p['sensitivity'])} | "
                     f"{_share(p['specificity'])} | {_share(p['accuracy'])} |")  # fmt: skip
    fractions = record["parasitized_fraction"]
    protocol = record["protocol"]  # the pairs in the protocol's order
    pairs = [f"{c}/{w}" for w in protocol["scores"] for c in protocol["candidates"]]
    lines += ["", "| parasitized share of the slide's crops | infected patients | "
              + " | ".join(f"{p.replace('/', ', ')}" for p in pairs) + " |",
              "|---|---|" + "---|" * len(pairs)]  # fmt: skip
    for low, high in BINS:
        slides = [s for s, v in fractions.items() if low < v <= high]
        caught = [sum(record["pairs"][p]["calls"][s] for s in slides) for p in pairs]
        lines.append(f"| ({low:.2f}, {high:.2f}] | {len(slides)} | "
                     + " | ".join(map(str, caught)) + " |")  # fmt: skip
    lines += ["", "| rule: false alarms on a healthy slide of | "
              + " | ".join(f"{n:,} crops" for n in SLIDE_SIZES) + " |",
              "|---|" + "---|" * len(SLIDE_SIZES)]  # fmt: skip
    for pair in pairs:
        folds = record["pairs"][pair]["folds"]
        alarms = np.array([[verdicts.false_alarm_rate(verdicts.VerdictRule.from_dict(f["rule"]), n,
                                                      f["measured_fpr"]) for n in SLIDE_SIZES]
                           for f in folds])  # fmt: skip
        cells = [f"{100 * a.mean():.2f}% ({100 * a.min():.2f}-{100 * a.max():.2f})"
                 for a in alarms.T]  # fmt: skip
        lines.append(f"| {pair.replace('/', ', ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
