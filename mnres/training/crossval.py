"""Patient-level k-fold cross-validation (Rajaraman et al. 2018) that resumes fold by fold.

Every cell of the data set (all of `config.data`'s source, split fractions ignored) is given
to one of k folds by slide: infected and uninfected patients are placed separately (the
stratification of `mnres.data.splits.split_by_slide`, which also balances cells per class),
so every fold holds both kinds of patients and no patient is in two folds. Fold k is the
test split of run k; the other folds are cut by slide into train and validation (validation
is `split_fractions[1] / (split_fractions[0] + split_fractions[1])` of them). The same
protocol with `split_by='image'` assigns cells independently: a patient's cells then sit in
train and test at once, and the gap between the two results is the leakage an image-level
split hides.

Layout of `workdir`::

  fold_0/ ... fold_{k-1}/   one training run each (mnres.training.loop), plus fold_spec.json,
                            calibration.json, test_outputs.npz and fold.json (written last)
  image_level/fold_*/       the image-level comparison, same files
  crossval.json, crossval.md, reliability_*.png, slide_fractions.png

A fold whose fold.json exists is done and skipped, so a run interrupted after fold 3 goes on
with fold 4; a fold interrupted mid-training resumes from its own checkpoints. A recipe search
records each finished patient-level fold in a committed folder (`experiments.search.records`).
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from mnres import atomic_file, metrics, run_folder, workdir_lock
from mnres.data import folds as folds_lib
from mnres.data.folds import FOLD_SPEC_JSON
from mnres.data.splits import Dataset
from mnres.metrics import calibration
from mnres.training import loop as train

FOLD_JSON = "fold.json"
CROSSVAL_JSON = "crossval.json"
CROSSVAL_MD = "crossval.md"
SLIDE_FRACTIONS_PNG = "slide_fractions.png"
IMAGE_LEVEL_DIR = "image_level"
CELL_METRICS = ("accuracy", "sensitivity", "specificity", "f1", "auc", "mcc")
PATIENT_METRICS = ("accuracy", "sensitivity", "specificity")
_PNGS = (
    run_folder.RELIABILITY_UNCALIBRATED_PNG,
    run_folder.RELIABILITY_CALIBRATED_PNG,
    SLIDE_FRACTIONS_PNG,
)


def run_fold(config, workdir: str, ds: Dataset, spec: dict, fold: int) -> dict:
    """Trains (or resumes) one fold (it calibrates itself) and writes its fold.json summary."""
    workdir_lock.claim(workdir)  # a run folder before its fold_spec.json is written
    run_folder.write_json(os.path.join(workdir, FOLD_SPEC_JSON), dict(spec, fold=fold))
    start = time.perf_counter()
    result = train.train_and_evaluate(config, workdir, dataset=ds, fold=fold)
    train_seconds = time.perf_counter() - start
    patient = result.get("test_patient")
    summary = {
        "fold": fold,
        "spec": spec,
        "num_train": len(ds.train),
        "num_validation": len(ds.validation),
        "num_test": len(ds.test),
        "test_slides": sorted({str(s) for s in ds.test.slide_ids if s}),
        "test": {k: result["test"][k] for k in CELL_METRICS},
        "test_patient": (
            {k: patient[k] for k in (*PATIENT_METRICS, "fraction_threshold", "n_patients")}
            if patient
            else None
        ),
        "slides": patient["slides"] if patient else None,
        "calibration": result["calibration"],
        # This command's, plus the epochs earlier invocations trained (a resumed fold).
        "wall_time_s": train_seconds + result["training"]["earlier_epochs_seconds"],
        "evaluated_step": result["training"]["evaluated_step"],
        # A fold that did not learn says so here too, not only in its own report.json.
        "warnings": list(result.get("warnings") or []),
    }
    # Written last: its presence means the fold is complete.
    run_folder.write_json(os.path.join(workdir, FOLD_JSON), summary)
    return summary


def summarize(values) -> dict:
    """{mean, std (sample, ddof=1; 0 for one value), n, values}; None entries are left out."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return {"mean": float(np.mean(kept)), "std": std, "n": len(kept), "values": list(values)}


def aggregate(summaries: list[dict]) -> dict:
    """Mean +/- std over folds of the cell, patient and calibration metrics of each fold."""
    out = {"cell": {}, "patient": {}, "calibration": {}}
    for key in CELL_METRICS:
        out["cell"][key] = summarize([s["test"][key] for s in summaries])
    if all(s.get("test_patient") for s in summaries):
        for key in PATIENT_METRICS:
            out["patient"][key] = summarize([s["test_patient"][key] for s in summaries])
    for key in summaries[0]["calibration"]:
        out["calibration"][key] = summarize([s["calibration"][key] for s in summaries])
    out["wall_time_s"] = float(sum(s["wall_time_s"] for s in summaries))
    return out


def _pooled(workdir: str, summaries: list[dict], by_slide: bool) -> dict:
    """Out-of-fold results: every cell scored by the run that did not train on it.

    Patients are pooled only for folds by slide: by image, a slide is spread over the folds.
    """
    probs, calibrated, labels = [], [], []
    for s in summaries:
        fold_dir = os.path.join(workdir, f"fold_{s['fold']}")
        outputs = run_folder.read_test_outputs(fold_dir)
        probs.append(calibration.calibrated_probs(outputs["log_odds"], 1.0))
        calibrated.append(
            calibration.calibrated_probs(outputs["log_odds"], s["calibration"]["temperature"])
        )
        labels.append(outputs["labels"])
    probs, calibrated, labels = map(np.concatenate, (probs, calibrated, labels))
    pooled = {
        "cell": metrics.binary_metrics(labels, probs),
        "ece_before": metrics.expected_calibration_error(labels, probs),
        "ece_after": metrics.expected_calibration_error(labels, calibrated),
        "arrays": (labels, probs, calibrated),
    }
    if by_slide and all(s.get("slides") for s in summaries):
        slides = [row for s in summaries for row in s["slides"]]
        infected = np.array([r["infected"] for r in slides], np.int64)
        called = np.array([r["predicted_infected"] for r in slides], np.int64)
        pooled["patient"] = {
            "n_patients": len(slides),
            "n_infected": int(infected.sum()),
            "sensitivity": float(np.mean(called[infected == 1])) if infected.any() else None,
            "specificity": float(np.mean(1 - called[infected == 0]))
            if (infected == 0).any()
            else None,
            "errors": [r["slide_id"] for r in slides if not r["correct"]],
        }
        pooled["slides"] = slides
    return pooled


def _run_folds(config, workdir, spec, folds_to_run, after_fold) -> list[dict]:
    """Runs the missing folds among `folds_to_run`; returns the summaries of every done fold."""
    num_folds, split_by = spec["num_folds"], spec["split_by"]
    done = {}
    pool = assignment = manifest = None
    for fold in range(num_folds):
        fold_dir = os.path.join(workdir, f"fold_{fold}")
        marker = os.path.join(fold_dir, FOLD_JSON)
        if os.path.isfile(marker):
            summary = run_folder.read_json(marker)
            if summary["spec"] != spec:
                raise ValueError(
                    f"{fold_dir} was run with {summary['spec']}, not {spec}: use a new workdir "
                    "for another fold count, split or seed"
                )
            done[fold] = summary
            logging.info("Fold %d/%d (%s) is done; skipping it.", fold, num_folds, split_by)
            continue
        if fold not in folds_to_run:
            continue
        if pool is None:
            pool, manifest = folds_lib.load_pool(config.data, spec["seed"])
            assignment = folds_lib.assign_folds(
                pool.labels, pool.slide_ids, num_folds, spec["seed"], split_by
            )
        ds = folds_lib.fold_dataset(pool, assignment, fold, spec, manifest)
        logging.info(
            "Fold %d/%d (%s): %d train / %d validation / %d test cells.",
            fold, num_folds, split_by, len(ds.train), len(ds.validation), len(ds.test),
        )  # fmt: skip
        done[fold] = run_fold(config, fold_dir, ds, spec, fold)
        if after_fold is not None:
            after_fold(fold_dir, ds)
    return [done[k] for k in sorted(done)]


def run_crossval(
    config,
    workdir: str,
    *,
    num_folds: int = 5,
    folds=None,
    patient_level: bool = True,
    compare_image_level: bool = True,
    after_fold=None,
    fold_seed: int | None = None,
) -> dict:
    """Runs (or resumes) patient-level k-fold cross-validation; writes crossval.json/.md.

    Args:
      config: the experiment ConfigDict (as `mnres.training.loop.train_and_evaluate` takes it).
      workdir: the cross-validation folder; one subfolder per fold.
      num_folds: k.
      folds: the fold indices to run in this call (None: all); finished folds are skipped
        whatever this says, so calling again with None completes the rest.
      patient_level: run the folds split by slide (False: image-level only, for sources
        without slide ids such as TFDS malaria).
      compare_image_level: also run the same folds split by image (in image_level/).
      after_fold: called as `after_fold(fold_dir, dataset)` when a patient-level fold has
        finished in this call (e.g. to record it for a recipe search, `experiments.search.records`).
      fold_seed: the seed that cuts the folds (`fold_spec`); None: config.seed.

    Returns:
      The crossval.json dict: per-fold summaries and mean/std ('folds', 'aggregate',
      'pooled', and the same under 'image_level'); 'complete' is False while folds are missing.

    Raises:
      workdir_lock.WorkdirBusyError: another live cross-validation holds `workdir`.
    """
    folds_to_run = set(range(num_folds) if folds is None else folds)
    bad = sorted(f for f in folds_to_run if not 0 <= f < num_folds)
    if bad:
        raise ValueError(f"folds {bad} are not in 0..{num_folds - 1}")
    if not (patient_level or compare_image_level):
        raise ValueError("nothing to run: enable patient-level or image-level folds")
    runs = [("slide", workdir)] if patient_level else []
    if compare_image_level:
        runs.append(("image", os.path.join(workdir, IMAGE_LEVEL_DIR)))
    runs = [
        (folds_lib.fold_spec(config, num_folds, split_by, fold_seed), run_dir)
        for split_by, run_dir in runs
    ]
    # The folds lock their own folders (fold_K/.lock): no run waits for this lock.
    with workdir_lock.lock(workdir, run_folder.CROSSVAL):
        return _crossval(config, workdir, runs, folds_to_run, after_fold)


def _crossval(config, workdir, runs, folds_to_run, after_fold):
    """`run_crossval` once the workdir is locked: the folds of each (spec, folder) of `runs`,
    then crossval.json and .md."""
    from mnres.reporting import plots  # here: a refused cross-validation never loads matplotlib

    result = {"num_folds": runs[0][0]["num_folds"], "config": config.to_dict()}
    for spec, run_dir in runs:
        split_by = spec["split_by"]
        hook = after_fold if split_by == "slide" else None
        workdir_lock.claim(run_dir, run_folder.CROSSVAL)  # image_level/: its own folder
        summaries = _run_folds(config, run_dir, spec, folds_to_run, hook)
        section = {"folds": summaries, "complete": len(summaries) == spec["num_folds"]}
        if summaries:
            section["aggregate"] = aggregate(summaries)
            pooled = _pooled(run_dir, summaries, split_by == "slide")
            labels, probs, calibrated = pooled.pop("arrays")
            section["pooled"] = pooled
            if run_dir == runs[0][1]:  # the plots show the main comparison's folds
                plots.plot_reliability(labels, probs, os.path.join(
                    workdir, run_folder.RELIABILITY_UNCALIBRATED_PNG))  # fmt: skip
                plots.plot_reliability(labels, calibrated, os.path.join(
                    workdir, run_folder.RELIABILITY_CALIBRATED_PNG))  # fmt: skip
                if pooled.get("slides"):
                    plots.plot_slide_fractions(
                        pooled["slides"], os.path.join(workdir, SLIDE_FRACTIONS_PNG),
                        title=f"Test slides of {len(summaries)} folds (each slide tested once)",
                    )  # fmt: skip
        result["patient_level" if split_by == "slide" else "image_level"] = section
    run_folder.write_json(os.path.join(workdir, CROSSVAL_JSON), result)
    pngs = [p for p in _PNGS if os.path.isfile(os.path.join(workdir, p))]
    atomic_file.write_text(os.path.join(workdir, CROSSVAL_MD), markdown(result, pngs))
    return result


def _pm(entry) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def _value(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def markdown(result: dict, pngs=()) -> str:
    """crossval.md: per-fold and mean ± std tables, the image-level split beside them."""
    by_patient = "patient_level" in result
    primary = result.get("patient_level") or result.get("image_level") or {}
    secondary = (result.get("image_level") or {}) if by_patient else {}
    folds = primary.get("folds") or []
    k = result["num_folds"]
    lines = [f"# {k}-fold cross-validation", ""]
    if not primary.get("complete"):
        lines += [f"**Incomplete**: {len(folds)} of {k} folds done; run again to finish.", ""]
    if not folds:
        return "\n".join(lines)
    lines += [
        f"> **Warning, fold {s['fold']}:** {w}\n" for s in folds for w in s.get("warnings") or []
    ]
    agg = primary["aggregate"]
    image_agg = secondary.get("aggregate")
    how = (
        "Folds by slide, stratified by infected/uninfected patient: no patient's cells are in "
        "two of train, validation and test."
        if by_patient
        else "Folds by image: a patient's cells can be in train and test (leakage)."
    )
    lines += [
        how + " Test cells, threshold 0.5; mean ± sample std over folds."
        + (" The image-level column splits cells independently (patients leak)."
           if image_agg else ""),
        "",
    ]  # fmt: skip
    lines += _fold_table(folds, agg, image_agg, by_patient)
    lines += [""]
    pooled = primary.get("pooled") or {}
    if pooled.get("patient"):
        p = pooled["patient"]
        errors = ", ".join(f"`{e}`" for e in p["errors"]) or "none"
        lines += [
            f"Patients of the test folds (each tested once): {p['n_patients']} "
            f"({p['n_infected']} infected); sensitivity {_value(p['sensitivity'])}, "
            f"specificity {_value(p['specificity'])}. Misclassified: {errors}.",
            "",
        ]
    lines += [
        f"Wall time (training and evaluation): {agg['wall_time_s'] / 60:.1f} min for "
        f"{len(folds)} fold(s)"
        + (f", plus {image_agg['wall_time_s'] / 60:.1f} min image-level." if image_agg else "."),
        "",
    ]
    for png in pngs:
        lines += [f"![{os.path.splitext(png)[0]}]({png})", ""]
    return "\n".join(lines)


def _fold_table(folds, agg: dict, image_agg: dict | None, by_patient: bool) -> list[str]:
    """crossval.md's table: a metric per row, a column per fold, then mean ± std."""
    main = "by patient" if by_patient else "by image"
    header = ["Metric"] + [f"fold {s['fold']}" for s in folds] + [f"mean ± std ({main})"]
    header += ["mean ± std (by image)"] if image_agg else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(f"{key}", "cell", key, "test") for key in CELL_METRICS]
    if agg["patient"]:
        rows += [(f"patient {key}", "patient", key, "test_patient") for key in PATIENT_METRICS]
    rows += [
        ("temperature", "calibration", "temperature", "calibration"),
        ("ECE before scaling", "calibration", "ece_before", "calibration"),
        ("ECE after scaling", "calibration", "ece_after", "calibration"),
        ("sensitivity at val. spec. 95%", "calibration", "sensitivity_at_spec_95", "calibration"),
        ("specificity reached (95%)", "calibration", "specificity_at_spec_95", "calibration"),
        ("sensitivity at val. spec. 98%", "calibration", "sensitivity_at_spec_98", "calibration"),
        ("specificity reached (98%)", "calibration", "specificity_at_spec_98", "calibration"),
    ]
    for label, group, key, field in rows:
        cells = [_value((s.get(field) or {}).get(key)) for s in folds]
        row = [label, *cells, _pm(agg[group].get(key))]
        if image_agg:
            row.append(_pm(image_agg[group].get(key)))
        lines.append("| " + " | ".join(row) + " |")
    return lines
