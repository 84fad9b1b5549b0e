"""Per-fold ensembles of recorded recipes, scored as a recipe of the search without leaks.

An ensemble of the 5 fold models has seen every fold's test slides. This one does not: the
members of fold K are the fold-K runs of recipes already recorded in the search
(`experiments.search.records`), each trained on fold K's training slides only, so fold K's
validation and test slides are new to all of them. The members differ by recipe (a colour
normalisation, a loss, an augmentation) or by anything else that leaves the folds alone.

The ensemble averages the members' log-odds of each crop (each member with its own test-time
augmentation); with the slide prior, each slide's prevalence then replaces the training
split's (`mnres.metrics.slide_prior`), and one member's runs can be scored that way too.
Its record has the fields of a trained recipe's (`fold_summary.summarize_fold`): the validation
figures and patient decisions it is compared on, the sealed test figures, and as its wall time
the sum of its members' (training them is its cost). `record_ensemble` scores and records the
folds whose members are all recorded (`python -m experiments.ensemble_folds`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import numpy as np
from absl import logging

from experiments.search import fold_summary
from experiments.search import records as search
from experiments.search.records import CELL_METRICS
from mnres import metrics, provenance, run_folder
from mnres.metrics import calibration, slide_prior

COMBINE = "mean_log_odds"


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How the members' runs are scored.

    slide_prior: each slide's prevalence in place of the training split's (`slide_prior`).
    checkpoint: 'best' (the checkpoint each run evaluated, chosen by per-epoch validation
      accuracy) or 'latest' (the weights at the end of training, chosen by nothing).
    """

    slide_prior: bool = False
    checkpoint: str = "best"

    def __post_init__(self):
        if self.checkpoint not in ("best", "latest"):
            raise ValueError(f"checkpoint {self.checkpoint!r}: use 'best' or 'latest'")


def ensemble_config(members, scoring: Scoring = Scoring()) -> dict:
    """The recipe config of an ensemble: its members' recipe names and how they are scored."""
    config = {"members": list(members), "combine": COMBINE, "slide_prior": scoring.slide_prior}
    if scoring.checkpoint != "best":  # records made before the option have none
        config["checkpoint"] = scoring.checkpoint
    return {"ensemble": config}


def describe(members, scoring: Scoring = Scoring()) -> str:
    """The ensemble's changes, as the search table names them."""
    members = list(members)
    text = members[0] if len(members) == 1 else f"ensemble of {', '.join(members)} (mean log-odds)"
    text += ", latest checkpoint" if scoring.checkpoint == "latest" else ""
    return text + (", slide prior" if scoring.slide_prior else "")


def mean_log_odds(outputs: list[dict], what: str) -> dict:
    """{'labels', 'log_odds', 'probs'} averaged over members' outputs of the same crops.

    Args:
      outputs: per member {'labels', 'log_odds'} and, when known, 'names' (crop file names).
      what: the split's name, for the error.

    Raises:
      ValueError: members scored other crops (labels or names differ).
    """
    first = outputs[0]
    for other in outputs[1:]:
        same = np.array_equal(other["labels"], first["labels"])
        if "names" in first and "names" in other:
            same = same and np.array_equal(other["names"], first["names"])
        if not same:
            raise ValueError(f"the members scored different {what} crops: not one fold's split")
    log_odds = np.mean([np.asarray(o["log_odds"], np.float64) for o in outputs], axis=0)
    return {
        "labels": np.asarray(first["labels"]),
        "log_odds": log_odds,
        "probs": calibration.calibrated_probs(log_odds, 1.0),
    }


def score(val: dict, val_slide_ids, test: dict, test_slide_ids) -> tuple[dict, dict]:
    """(validation figures, test figures) of combined outputs, as a trained fold reports them:
    cells at P >= 0.5; patients by the fraction rule, the test threshold chosen on validation.
    """
    cells = metrics.binary_metrics(val["labels"], val["probs"])
    patients = fold_summary.validation_patients(val["labels"], val["probs"], val_slide_ids)
    validation = {"cell": {k: cells[k] for k in (*CELL_METRICS, "n")}, "patients": patients}
    test_cells = metrics.binary_metrics(test["labels"], test["probs"])
    test_patients = None
    if patients is not None and all(str(s) for s in test_slide_ids):
        found = metrics.patient_metrics(
            test["labels"], test["probs"], test_slide_ids, patients["fraction_threshold"]
        )
        test_patients = {k: found.get(k) for k in fold_summary.TEST_PATIENT}
    record = calibration.calibrate(val["log_odds"], val["labels"], test["log_odds"], test["labels"])
    tested = {
        "cell": {k: test_cells[k] for k in (*CELL_METRICS, "f1", "n")},
        "patients": test_patients,
        "calibration": calibration.report_summary(record),
    }
    return validation, tested


def _latest_outputs(fold_dir: str, dataset) -> tuple[dict, dict]:
    """Validation and test outputs of a run's weights at the end of training."""
    report = run_folder.read_report(fold_dir)
    classifier = run_folder.load_run(fold_dir, which="latest")
    if classifier.metadata["step"] != report["training"]["total_steps"]:
        raise ValueError(f"{fold_dir}: its latest checkpoint is not the end of its training")
    batch = int(run_folder.read_config(fold_dir).eval_batch_size)
    outputs = []
    for split in (dataset.validation, dataset.test):
        logits = classifier.logits(split.images, batch_size=batch)
        outputs.append({
            "labels": np.asarray(split.labels),
            "log_odds": calibration.log_odds(logits),
            "names": np.asarray(split.names),
            "slide_ids": np.asarray(split.slide_ids),
        })  # fmt: skip
    return outputs[0], outputs[1]


def _member_outputs(fold_dir: str, dataset, checkpoint: str) -> tuple[dict, dict]:
    """A member run's (validation, test) outputs from the checkpoint `checkpoint` names."""
    if checkpoint == "latest":
        return _latest_outputs(fold_dir, dataset)
    report = run_folder.read_report(fold_dir)
    val = fold_summary.validation_outputs(fold_dir, report, dataset.validation)
    test = run_folder.read_test_outputs(fold_dir)
    if "log_odds" not in test:
        raise ValueError(f"{fold_dir} is not a two-class run: ensembles average log-odds")
    return val, test


def summarize_ensemble_fold(
    members: dict[str, tuple[dict, str]], recipe: str, dataset, scoring: Scoring = Scoring()
):
    """The record of fold K of an ensemble: (validation summary, test summary).

    Args:
      members: {member recipe: (its recorded fold-K summary, its fold-K run folder)}; the folder
        must be the recorded run (`fold_summary.is_recorded`).
      recipe: the ensemble's name in the search.
      dataset: the fold's rebuilt `Dataset` (`fold_summary.rebuilt_dataset`).
      scoring: the checkpoint scored, and whether each slide's prevalence replaces the
        training split's (`slide_prior.adjust`).

    Raises:
      ValueError: members of other folds or splits, or outputs that disagree with a member's
        report.json (`fold_summary.validation_outputs`).
    """
    recorded = {name: summary for name, (summary, _) in members.items()}
    first = next(iter(recorded.values()))
    for name, summary in recorded.items():
        if (summary["fold"], summary["spec"], summary["validation_names_sha256"]) != (
            first["fold"], first["spec"], first["validation_names_sha256"]
        ):  # fmt: skip
            raise ValueError(f"member {name} is another fold or split than {first['recipe']}")
    val_outputs, test_outputs = [], []
    for _, fold_dir in members.values():
        val, test = _member_outputs(fold_dir, dataset, scoring.checkpoint)
        val_outputs.append(val)
        test_outputs.append(test)
    val = mean_log_odds(val_outputs, "validation")
    test = mean_log_odds(test_outputs, "test")
    prevalence = float(np.mean(dataset.train.labels))
    if scoring.slide_prior:
        for split, slide_ids in ((val, dataset.validation.slide_ids),
                                 (test, test_outputs[0]["slide_ids"])):  # fmt: skip
            split["log_odds"] = slide_prior.adjust(split["log_odds"], slide_ids, prevalence)
            split["probs"] = calibration.calibrated_probs(split["log_odds"], 1.0)
    validation, tested = score(
        val, dataset.validation.slide_ids, test, test_outputs[0]["slide_ids"]
    )
    found = provenance.collect()
    summary = {
        "recipe": recipe,
        "fold": first["fold"],
        "num_folds": first["num_folds"],
        "spec": first["spec"],
        "config": ensemble_config(recorded, scoring),
        "changes": describe(recorded, scoring),
        "train_prevalence": prevalence,
        "members": {
            name: {k: s[k] for k in ("changes", "evaluated", "wall_seconds", "provenance")}
            for name, s in recorded.items()
        },
        "validation": validation,
        "validation_names_sha256": first["validation_names_sha256"],
        "evaluated": {
            "checkpoint": "members" if scoring.checkpoint == "best" else scoring.checkpoint,
            "step": None,
            "test_time_augmentation": all(
                s["evaluated"]["test_time_augmentation"] for s in recorded.values()
            ),
        },
        "epochs": first["epochs"],
        "wall_seconds": float(sum(s["wall_seconds"] for s in recorded.values())),
        "warnings": [w for s in recorded.values() for w in s.get("warnings") or []],
        "provenance": {
            "commit": found["git"]["commit"],
            "dirty": found["git"]["dirty"],
            "versions": found["versions"],
            "cpu": (found.get("cpu") or {}).get("model"),
            "devices": found["devices"],
        },
        "recorded": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    test_summary = {
        "recipe": recipe,
        "fold": first["fold"],
        **tested,
        "test_slides": sorted({str(s) for s in test_outputs[0]["slide_ids"] if str(s)}),
    }
    return summary, test_summary


def _spec(search_dir: str, members: dict[str, str]) -> dict:
    """The members' fold spec (they must share it)."""
    specs = {}
    for name in members:
        folds = search.read_recipe(os.path.join(search_dir, name))
        if not folds:
            raise ValueError(f"{name} has no recorded fold in {search_dir}")
        specs[name] = next(iter(folds.values()))["spec"]
    first = next(iter(specs.values()))
    other = [n for n, s in specs.items() if {**s, "fold": 0} != {**first, "fold": 0}]
    if other:
        raise ValueError(f"members {', '.join(other)} have other folds than {next(iter(specs))}")
    return first


def record_ensemble(
    record_dir: str, members: dict[str, str], data_location: dict, scoring: Scoring = Scoring()
) -> list[int]:
    """Scores and records every fold of an ensemble that is ready and not recorded yet.

    Args:
      record_dir: the ensemble's folder in the search (SEARCH/NAME); the members' records are
        its sibling folders.
      members: {member recipe: its cross-validation workdir (fold_K/ folders)}.
      data_location: config.data fields (dir, cache_dir) that say where the data lie here.
      scoring: how the members' runs are scored (`Scoring`).

    Returns:
      The folds recorded now. A fold some member has not recorded, or whose run is not in its
      workdir, is left for a later call (with a warning).

    Raises:
      SearchError: `record_dir` holds another ensemble; ValueError: members of other folds.
    """
    search_dir = os.path.dirname(os.path.normpath(record_dir))
    recipe = os.path.basename(os.path.normpath(record_dir))
    spec = _spec(search_dir, members)
    search.check_same_recipe(record_dir, ensemble_config(members, scoring), spec)
    recorded_before = search.read_recipe(record_dir)
    done = []
    for k in range(spec["num_folds"]):
        if k in recorded_before:
            continue
        ready, why = fold_summary.ready_members(search_dir, members, k)
        if ready is None:
            logging.warning("Fold %d is not scored: %s.", k, why)
            continue
        dataset = fold_summary.rebuilt_dataset(next(iter(ready.values()))[1], data_location)
        summary, test = summarize_ensemble_fold(ready, recipe, dataset, scoring)
        search.record_fold(record_dir, summary, test)
        logging.info(
            "Recorded fold %d of %s: validation accuracy %.4f, AUC %.4f.",
            k, recipe, summary["validation"]["cell"]["accuracy"],
            summary["validation"]["cell"]["auc"],
        )  # fmt: skip
        done.append(k)
    return done
