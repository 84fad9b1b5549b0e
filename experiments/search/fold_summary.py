"""The record of one finished cross-validation fold, for the recipe search (`search`).

`summarize_fold` reads a fold folder of `mnres.training.crossval` (report.json, fold.json,
manifest.json, its checkpoints) and returns what `search.record_fold` commits: the validation
summary a recipe is compared on and the sealed test summary. The run folder keeps no per-cell
validation outputs, so they are recomputed from the checkpoint the run evaluated, on the fold's
rebuilt validation split (`folds_lib.dataset_for_run`), and checked against report.json's
validation figures before the patient decisions are made from them.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re

import numpy as np
from absl import logging

from experiments.search.records import (
    CELL_METRICS,
    SearchError,
    check_same_recipe,
    config_changes,
    read_recipe,
    record_fold,
    run_recipe_config,
)
from mnres import metrics, run_folder
from mnres.data import folds as folds_lib
from mnres.data.splits import names_sha256
from mnres.training import crossval

TEST_PATIENT = ("n_patients", "n_infected", "accuracy", "sensitivity", "specificity", "auc",
                "fraction_threshold", "errors")  # fmt: skip
# The agreement asked of the recomputed validation outputs with report.json: the same weights
# on the same crops, up to the last bits of XLA's arithmetic on another CPU.
_AGREE_CELLS, _AGREE_AUC = 2, 1e-3
_ROUNDING = 16 * float(np.finfo(np.float32).eps)  # outputs closer than this are one
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


def validation_patients(labels, probs, slide_ids) -> dict | None:
    """Patient decisions on validation slides, each threshold chosen on the other slides.

    Returns:
      {rule, n_patients, n_infected, right, sensitivity, specificity, auc (the fraction as a
      score), fraction_threshold (chosen on every slide: the one the run applied to its test
      patients), errors, slides (`metrics.slide_table` rows with fraction_threshold,
      predicted_infected, correct)}; None without two known slides.
    """
    slide_ids = np.array([str(s) for s in slide_ids])
    if not len(slide_ids) or not all(slide_ids) or len(set(slide_ids)) < 2:
        return None
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    rows = metrics.slide_table(labels, probs, slide_ids)
    for row in rows:
        others = slide_ids != row["slide_id"]
        t = metrics.choose_fraction_threshold(labels[others], probs[others], slide_ids[others])
        row.update(fraction_threshold=t, predicted_infected=row["predicted_fraction"] > t)
        row["correct"] = row["predicted_infected"] == row["infected"]
    infected = np.array([r["infected"] for r in rows])
    called = np.array([r["predicted_infected"] for r in rows])
    rate = lambda mask, value: float(np.mean(called[mask] == value)) if mask.any() else None
    everyone = metrics.choose_fraction_threshold(labels, probs, slide_ids)
    return {
        "rule": "infected iff fraction called > threshold chosen on the other validation slides",
        "n_patients": len(rows),
        "n_infected": int(infected.sum()),
        "right": int(sum(r["correct"] for r in rows)),
        "sensitivity": rate(infected, True),
        "specificity": rate(~infected, False),
        "auc": metrics.patient_metrics(labels, probs, slide_ids, everyone)["auc"],
        "fraction_threshold": everyone,
        "errors": [r["slide_id"] for r in rows if not r["correct"]],
        "slides": rows,
    }


def validation_outputs(fold_dir: str, report: dict, split) -> dict:
    """{'labels', 'probs', 'log_odds'} of `split` from the checkpoint the run evaluated, with its
    test-time augmentation, checked against report.json's validation figures.

    Raises:
      ValueError: another checkpoint step, or figures that disagree (other crops).
    """
    config = run_folder.read_config(fold_dir)
    which = "best" if config.eval_checkpoint == "best" else "latest"
    classifier = run_folder.load_run(fold_dir, which=which)
    step = report["training"]["evaluated_step"]
    if classifier.metadata["step"] != step:
        raise ValueError(
            f"{fold_dir}: report.json evaluated step {step}, its checkpoints give step "
            f"{classifier.metadata['step']}"
        )
    logits = classifier.logits(split.images, batch_size=int(config.eval_batch_size))
    log_odds = logits[:, 1].astype(np.float64) - logits[:, 0]
    probs = 1.0 / (1.0 + np.exp(-log_odds))
    # Compared in float32, as the run computed its figures: a confident model's P(parasitized)
    # rounds to 1.0 there, and those ties move its AUC by more than the arithmetic of two CPUs.
    probs32 = probs.astype(np.float32)
    again = metrics.binary_metrics(split.labels, probs32)
    reported = report["validation"]
    cells = abs(again["accuracy"] - reported["accuracy"]) * again["n"]
    # Outputs within rounding of one another (one output for every crop, not merely the
    # near-constant ones metrics.output_collapse flags) rank noise: their AUC is not compared.
    ranks = np.ptp(probs32) > _ROUNDING
    auc = abs((again["auc"] or 0.0) - (reported["auc"] or 0.0)) if ranks else 0.0
    if again["n"] != reported["n"] or cells > _AGREE_CELLS + 0.5 or auc > _AGREE_AUC:
        raise ValueError(
            f"{fold_dir}: re-evaluated validation (n {again['n']}, accuracy "
            f"{again['accuracy']:.4f}, AUC {again['auc']}) disagrees with report.json (n "
            f"{reported['n']}, {reported['accuracy']:.4f}, {reported['auc']}): not the crops "
            "or weights the run was evaluated on"
        )
    return {"labels": np.asarray(split.labels), "probs": probs, "log_odds": log_odds}


def crop_outputs(fold_dir: str, report: dict, dataset) -> dict[str, np.ndarray]:
    """A run's per-crop outputs, validation rows then test rows: split, name, slide_id, label,
    log_odds and prob (of parasitized), from the checkpoint the run evaluated.

    The validation rows are recomputed (`validation_outputs`, checked against report.json); the
    test rows are the run's own test_outputs.npz, checked to be `dataset`'s test crops.
    """
    val = validation_outputs(fold_dir, report, dataset.validation)
    test = run_folder.read_test_outputs(fold_dir)
    if "log_odds" not in test:
        raise ValueError(f"{fold_dir} is not a two-class run: no log-odds of parasitized")
    if not np.array_equal(test["names"], np.asarray(dataset.test.names)):
        raise ValueError(f"{fold_dir}: its test outputs are of other crops than its fold's")
    log_odds = np.concatenate([val["log_odds"], test["log_odds"]]).astype(np.float32)
    n_val, n_test = len(val["labels"]), len(test["labels"])
    return {
        "split": np.array(["validation"] * n_val + ["test"] * n_test),
        "name": np.concatenate([np.asarray(dataset.validation.names), test["names"]]),
        "slide_id": np.concatenate([np.asarray(dataset.validation.slide_ids), test["slide_ids"]]),
        "label": np.concatenate([val["labels"], test["labels"]]).astype(np.int32),
        "log_odds": log_odds,
        "prob": (1.0 / (1.0 + np.exp(-log_odds.astype(np.float64)))).astype(np.float32),
    }


def _provenance(report: dict) -> dict:
    found = report.get("provenance") or {}
    git = found.get("git") or {}
    return {
        "commit": git.get("commit"),
        "dirty": git.get("dirty"),
        "versions": found.get("versions"),
        "cpu": (found.get("cpu") or {}).get("model"),
        "devices": found.get("devices"),
    }


def _evaluated(report: dict) -> dict:
    training = report["training"]
    return {
        "checkpoint": training["evaluated_checkpoint"],
        "step": training["evaluated_step"],
        "test_time_augmentation": training["test_time_augmentation"],
    }


def summarize_fold(
    fold_dir: str,
    recipe: str,
    *,
    baseline: dict | None = None,
    dataset=None,
    data_location: dict | None = None,
) -> tuple[dict, dict]:
    """The record of a finished cross-validation fold: (validation summary, test summary).

    Args:
      fold_dir: WORKDIR/fold_K of `crossval.run_crossval` (fold.json written: finished).
      recipe: the recipe's name.
      baseline: a config dict the summary names its changes against.
      dataset: the fold's `Dataset` if at hand; else rebuilt (`folds_lib.dataset_for_run`).
      data_location: config.data fields (dir, cache_dir) that replace the run's to rebuild it.

    Raises:
      ValueError: an unfinished fold, a rebuilt split that is not the run's, or outputs that
        disagree with report.json.
    """
    if not os.path.isfile(os.path.join(fold_dir, crossval.FOLD_JSON)):
        raise ValueError(f"{fold_dir} is not a finished cross-validation fold (no fold.json)")
    fold = run_folder.read_json(os.path.join(fold_dir, crossval.FOLD_JSON))
    report = run_folder.read_report(fold_dir)
    if not report.get("validation"):
        raise ValueError(f"{fold_dir} has no validation figures to compare recipes on")
    if dataset is None:
        dataset = rebuilt_dataset(fold_dir, data_location)
    run_splits = run_folder.read_manifest(fold_dir)["splits"]
    for name in ("validation", "test"):
        if dataset.manifest["splits"][name]["names_sha256"] != run_splits[name]["names_sha256"]:
            raise ValueError(f"{fold_dir}: the rebuilt {name} split is not the run's")
    outputs = validation_outputs(fold_dir, report, dataset.validation)
    val, spec = report["validation"], fold["spec"]
    config = run_recipe_config(report)
    summary = {
        "recipe": recipe,
        "fold": fold["fold"],
        "num_folds": spec["num_folds"],
        "spec": spec,
        "config": config,
        "changes": None if baseline is None else config_changes(config, baseline),
        "validation": {
            "cell": {k: val[k] for k in (*CELL_METRICS, "n")},
            "patients": validation_patients(
                outputs["labels"], outputs["probs"], dataset.validation.slide_ids
            ),
        },
        "validation_names_sha256": run_splits["validation"]["names_sha256"],
        "evaluated": _evaluated(report),
        "epochs": report["training"]["epochs"],
        "wall_seconds": fold["wall_time_s"],
        "warnings": fold.get("warnings") or [],
        "provenance": _provenance(report),
        "recorded": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    patient = report.get("test_patient") or {}
    test = {
        "recipe": recipe,
        "fold": fold["fold"],
        "cell": {k: report["test"][k] for k in (*CELL_METRICS, "f1", "n")},
        "patients": {k: patient.get(k) for k in TEST_PATIENT} if patient else None,
        "test_slides": fold.get("test_slides"),
        "calibration": report.get("calibration"),
    }
    return summary, test


def is_recorded(record_dir: str, fold_dir: str) -> bool:
    """Whether `fold_dir`'s evaluation is the one recorded for its fold (report.json only)."""
    fold_json = os.path.join(fold_dir, crossval.FOLD_JSON)
    if not os.path.isfile(fold_json):
        return False
    k = run_folder.read_json(fold_json)["fold"]
    done = read_recipe(record_dir).get(k)
    if done is None:
        return False
    report = run_folder.read_report(fold_dir)
    return done["evaluated"]["step"] == report["training"]["evaluated_step"] and all(
        done["validation"]["cell"][m] == report["validation"][m] for m in CELL_METRICS
    )


def rebuilt_dataset(fold_dir: str, data_location: dict | None = None):
    """The fold's `Dataset` rebuilt from its run folder, the data where `data_location`
    (config.data fields: dir, cache_dir) says they lie here."""
    config = run_folder.read_config(fold_dir)
    with config.data.unlocked():
        config.data.update({k: v for k, v in (data_location or {}).items() if v})
    return folds_lib.dataset_for_run(fold_dir, config)


def parse_members(specs: list[str]) -> dict[str, str]:
    """{recipe: workdir} of `RECIPE=WORKDIR` specs (the --member flags), each recipe once.

    Raises:
      ValueError: a malformed spec or a recipe given twice.
    """
    members = {}
    for spec in specs:
        name, sep, workdir = spec.partition("=")
        if not sep or not name or not workdir:
            raise ValueError(f"--member={spec}: expected RECIPE=WORKDIR")
        if name in members:
            raise ValueError(f"--member {name} is given twice: expected RECIPE=WORKDIR once each")
        members[name] = workdir
    return members


def ready_members(search_dir: str, members: dict[str, str], fold: int):
    """{recipe: (recorded fold summary, fold folder)} when every member's fold is recorded and
    its folder ({recipe: workdir}) holds that run; else (None, why)."""
    found = {}
    for name, workdir in members.items():
        summary = read_recipe(os.path.join(search_dir, name)).get(fold)
        fold_dir = os.path.join(workdir, f"fold_{fold}")
        if summary is None:
            return None, f"{name} has no recorded fold {fold}"
        if not is_recorded(os.path.join(search_dir, name), fold_dir):
            return None, f"{fold_dir} is not the run recorded for {name}"
        found[name] = (summary, fold_dir)
    return found, None


def retrained_member(search_dir: str, recipe: str, workdir: str, fold: int):
    """({recipe: (recorded fold summary, fold folder)}, None) when WORKDIR/fold_K is the
    recorded fold trained again with its recorded command (the same recipe and folds) and
    finished, whatever its evaluation: on another CPU the same command need not give the
    recorded weights, and its run is as much the recipe. Else (None, why)."""
    record_dir = os.path.join(search_dir, recipe)
    recorded = read_recipe(record_dir).get(fold)
    fold_dir = os.path.join(workdir, f"fold_{fold}")
    fold_json = os.path.join(fold_dir, crossval.FOLD_JSON)
    if recorded is None:
        return None, f"{recipe} has no recorded fold {fold}"
    if not os.path.isfile(fold_json):
        return None, f"{fold_dir} is not a finished cross-validation fold (no fold.json)"
    spec = run_folder.read_json(fold_json)["spec"]
    report = run_folder.read_report(fold_dir)
    config = run_recipe_config(report)
    try:
        check_same_recipe(record_dir, config, spec)
    except SearchError as e:
        return None, f"{fold_dir} is not a run of {recipe}'s recorded command: {e}"
    return {recipe: (recorded, fold_dir)}, None


def record_finished_folds(
    workdir: str, record_dir: str, *, baseline: dict | None = None, data_location=None
) -> list[int]:
    """Records every finished patient-level fold of `workdir` that `record_dir` lacks.

    Args:
      workdir: a cross-validation folder (`crossval.run_crossval`'s, folds in fold_K/).
      record_dir: the recipe's folder in the search (its name is the recipe's).
      baseline, data_location: as `summarize_fold` takes them.

    Returns:
      The folds recorded now.
    """
    recipe = os.path.basename(os.path.normpath(record_dir))
    names = os.listdir(workdir) if os.path.isdir(workdir) else []
    folds = sorted(int(m.group(1)) for m in map(_FOLD_DIR.match, names) if m)
    recorded = []
    for k in folds:
        fold_dir = os.path.join(workdir, f"fold_{k}")
        # Unfinished (or running now): it is recorded once it is done.
        if not os.path.isfile(os.path.join(fold_dir, crossval.FOLD_JSON)):
            continue
        if is_recorded(record_dir, fold_dir):
            continue
        summary, test = summarize_fold(
            fold_dir, recipe, baseline=baseline, data_location=data_location
        )
        if record_fold(record_dir, summary, test):
            recorded.append(k)
    return recorded


def record_crop_outputs(
    search_dir: str, members: dict[str, str], record: str, location: dict, retrained=False
) -> list[tuple[str, int]]:
    """`crop_outputs` of recorded folds, for `python -m experiments.fold_outputs runs`.

    Writes RECORD/RECIPE_fold_K.npz for each recorded fold of each recipe whose run folder in
    its workdir ({recipe: workdir}) holds the recorded run (`is_recorded`), or with `retrained`
    the fold trained again (`retrained_member`: its own outputs and evaluation, marked so), with
    its entry in RECORD/summary.json; files in RECORD already are kept. `location`: config.data
    fields (dir) that say where the crops lie here. Returns the (recipe, fold) pairs written.
    """
    os.makedirs(record, exist_ok=True)
    summary_path = os.path.join(record, "summary.json")
    summary = {"code": "python -m experiments.fold_outputs runs", "runs": []}
    if os.path.isfile(summary_path):
        summary = run_folder.read_json(summary_path)
    written, search_name = [], os.path.basename(os.path.normpath(search_dir))
    for recipe, workdir in members.items():
        folds = read_recipe(os.path.join(search_dir, recipe))
        if not folds:
            raise ValueError(f"{recipe} has no recorded fold in {search_dir}")
        for k in range(next(iter(folds.values()))["num_folds"]):
            out = f"{recipe}_fold_{k}.npz"
            if os.path.isfile(os.path.join(record, out)):
                continue
            ready, why = ready_members(search_dir, {recipe: workdir}, k)
            retrain = ready is None and retrained
            if retrain:
                ready, why = retrained_member(search_dir, recipe, workdir, k)
            if ready is None:
                logging.warning("%s fold %d is not written: %s.", recipe, k, why)
                continue
            recorded, fold_dir = ready[recipe]
            dataset = rebuilt_dataset(fold_dir, location)
            report = run_folder.read_report(fold_dir)
            rows = crop_outputs(fold_dir, report, dataset)
            if (
                names_sha256(rows["name"][rows["split"] == "validation"])
                != recorded["validation_names_sha256"]
            ):
                raise ValueError(f"{fold_dir}: its validation crops are not the recorded fold's")
            np.savez_compressed(os.path.join(record, out), **rows)
            with open(os.path.join(record, out), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            prov = _provenance(report) if retrain else recorded["provenance"]
            entry = {
                "recipe": recipe, "fold": k, "file": out, "file_sha256": digest,
                "source": f"the recorded run of {search_name}/{recipe}/fold_{k}",
                "evaluated": recorded["evaluated"],
                "validation_names_sha256": recorded["validation_names_sha256"],
                "test_names_sha256": names_sha256(rows["name"][rows["split"] == "test"]),
                "machine": {"cpu": prov.get("cpu"), "versions": prov.get("versions")},
            }  # fmt: skip
            if retrain:  # its own evaluation, the recorded one beside it
                entry.update(
                    source=f"{search_name}/{recipe}/fold_{k} trained again with its recorded "
                    "command (not the recorded run: its own outputs)",
                    evaluated=_evaluated(report),
                    validation={m: report["validation"][m] for m in CELL_METRICS},
                    recorded={"evaluated": recorded["evaluated"],
                              "validation": {m: recorded["validation"]["cell"][m]
                                             for m in CELL_METRICS}},
                )  # fmt: skip
            summary["runs"] = [r for r in summary["runs"] if r["file"] != out] + [entry]
            summary["runs"].sort(key=lambda r: (r["recipe"], r["fold"]))
            run_folder.write_json(summary_path, summary)
            written.append((recipe, k))
    return written
