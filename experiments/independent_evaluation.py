"""The maintainers' independent evaluation of the shipped model, read from its record.

The 40 held-out patients never enter this repository: the maintainers run `mnres predict` on
them once per shipped model and report the figures, which are kept in
experiments/results/independent_evaluation/shipped_malaria.json, keyed by the sha256 of the
weights they evaluated. `shipped()` returns the record only while those weights ship, so a
retrained model never inherits its predecessor's figures.
"""

from __future__ import annotations

import json
import pathlib

from mnres.provenance import file_sha256

REPO = pathlib.Path(__file__).resolve().parent.parent
RECORD = REPO / "experiments" / "results" / "independent_evaluation" / "shipped_malaria.json"
WEIGHTS = REPO / "mnres" / "weights" / "malaria" / "weights.msgpack"


def check(record: dict) -> None:
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
                raise ValueError(f"{RECORD.name}, {run['name']}: {name} {value:.5f} from the "
                                 f"counts, {run[name]} reported")  # fmt: skip


def shipped(record_path: pathlib.Path = RECORD, weights: pathlib.Path = WEIGHTS) -> dict | None:
    """The record when it evaluated the weights that ship now, else None."""
    with open(record_path) as f:
        record = json.load(f)
    check(record)
    return record if record["weights_sha256"] == file_sha256(weights) else None
