"""The maintainers' independent evaluations of the shipped model, read from their records.

The 40 held-out patients never enter this repository: the maintainers run `mnres predict` on
them once per shipped model and report the figures, kept one record per evaluated weights in
experiments/results/independent_evaluation/COMMIT.json (COMMIT: the commit that shipped them),
keyed by the sha256 of the weights. `shipped()` returns the record of the weights that ship now,
so a retrained model never inherits its predecessor's figures; `earlier()` the others, for the
history.
"""

from __future__ import annotations

import json
import pathlib

from mnres.provenance import file_sha256
from mnres.weights import shipped as shipped_model

REPO = pathlib.Path(__file__).resolve().parent.parent
RECORDS = REPO / "experiments" / "results" / "independent_evaluation"
WEIGHTS = shipped_model.shipped_folder() / shipped_model.WEIGHTS


def check(record: dict, source: str = "the record") -> None:
    """Raises ValueError unless every run's counts give back its reported percentages."""
    cells = record["cells"]
    for run in record["runs"]:
        got = {
            "sensitivity": run["true_positives"] / cells["parasitized"],
            "specificity": run["true_negatives"] / cells["uninfected"],
            "accuracy": (run["true_positives"] + run["true_negatives"]) / cells["n"],
        }
        for name, value in got.items():
            if round(value, 4) != run[name]:
                raise ValueError(f"{source}, {run['name']}: {name} {value:.5f} from the "
                                 f"counts, {run[name]} reported")  # fmt: skip


def records(folder: pathlib.Path = RECORDS) -> list[dict]:
    """Every record, checked, oldest report first."""
    out = []
    for path in sorted(folder.glob("*.json")):
        with open(path) as f:
            record = json.load(f)
        check(record, path.name)
        out.append(record)
    return sorted(out, key=lambda r: r["reported"])


def shipped(folder: pathlib.Path = RECORDS, weights: pathlib.Path = WEIGHTS) -> dict | None:
    """The record of the weights that ship now, else None."""
    sha = file_sha256(weights)
    return next((r for r in records(folder) if r["weights_sha256"] == sha), None)


def earlier(folder: pathlib.Path = RECORDS, weights: pathlib.Path = WEIGHTS) -> list[dict]:
    """The records of weights that shipped before."""
    sha = file_sha256(weights)
    return [r for r in records(folder) if r["weights_sha256"] != sha]
