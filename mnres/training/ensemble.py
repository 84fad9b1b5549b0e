"""An ensemble run folder, combined from finished training runs of the same slide split.

`combine` writes a run folder whose model is an `mnres.models.Ensemble` of the members' evaluated
checkpoints (the mean of their logits), evaluated as a training run is: validation and test
figures, the patient decisions with the fraction threshold chosen on validation, calibration
and operating points. `load_run`, `predict`, `export` and `experiments.package_model` then take
it as one model. With `slide_prior` (the recipe the patient cross-validation chose, see
docs/results.md) the cell and patient figures read each slide's crops with its own prevalence
(`mnres.metrics.slide_prior`), as `predict --slide-prior` does; the figures without it sit
beside them. Calibration is always fitted on the outputs without it, since `predict` applies the
temperature first and the slide prior after it.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from mnres import data, provenance, run_folder
from mnres.data.splits import class_names_of
from mnres.metrics import calibration
from mnres.metrics import slide_prior as slide_prior_lib
from mnres.models import ensemble
from mnres.models import params as params_lib
from mnres.training import final_evaluation

SPLITS = ("train", "validation", "test")


def _check_members(member_dirs, manifests, configs) -> None:
    """Raises ValueError unless every member saw the same crops in every split and answers
    the same question (classes, image size, test-time augmentation)."""
    if len(member_dirs) < 2:
        raise ValueError(f"an ensemble needs two or more runs, got {len(member_dirs)}")
    first = member_dirs[0]
    for d, manifest, config in zip(member_dirs[1:], manifests[1:], configs[1:], strict=True):
        split = _other_split(manifest, manifests[0])
        if split:
            raise ValueError(
                f"{d} and {first} were not trained on the same {split} crops (their "
                "manifest.json differ): members must share the data, seed and split"
            )
        if _answer(config) != _answer(configs[0]):
            raise ValueError(
                f"{d} and {first} differ in image size, classes or test-time augmentation: "
                "an ensemble gives one answer to one question"
            )


def _other_split(manifest: dict, reference: dict) -> str | None:
    """The first split whose crops (names_sha256) differ between two manifests, else None."""
    for split in SPLITS:
        ours = manifest["splits"][split].get("names_sha256")
        if ours is None or ours != reference["splits"][split].get("names_sha256"):
            return split
    return None


def _answer(config) -> tuple:
    return (
        int(config.data.image_size),
        config.data.class_names,
        bool(config.test_time_augmentation),
    )


def ensemble_config(member_dirs, configs, *, slide_prior: bool) -> ml_collections.ConfigDict:
    """The first member's config with the model replaced by the ensemble of every member's
    (`config.model.members`), and `config.ensemble` naming the members and their configs."""
    config = ml_collections.ConfigDict(configs[0].to_dict())
    with config.unlocked():
        config.model = ml_collections.ConfigDict(
            {"name": "ensemble", "members": [c.model.to_dict() for c in configs]}
        )
        config.ensemble = ml_collections.ConfigDict({
            "combine": "mean_logits",
            "slide_prior": bool(slide_prior),
            "members": [
                {"run": os.path.basename(os.path.normpath(d)), "config": c.to_dict()}
                for d, c in zip(member_dirs, configs, strict=True)
            ],
        })  # fmt: skip
    return config


def _outputs(classifier, split, batch_size: int) -> dict:
    logits = classifier.logits(split.images, batch_size=batch_size)
    return {"labels": np.asarray(split.labels), "log_odds": calibration.log_odds(logits)}


def _scored(outputs: dict, slide_ids, train_prevalence: float | None) -> dict:
    """Outputs with P(parasitized); with a training prevalence, each slide's prior in its place."""
    log_odds = outputs["log_odds"]
    if train_prevalence is not None:
        log_odds = slide_prior_lib.adjust(log_odds, slide_ids, train_prevalence)
    probs = calibration.calibrated_probs(log_odds, 1.0)
    eps = 1e-7
    labels = outputs["labels"]
    loss = -np.mean(labels * np.log(probs + eps) + (1 - labels) * np.log(1 - probs + eps))
    return {"labels": labels, "log_odds": log_odds, "probs": probs, "loss": float(loss)}


def _figures(val: dict, test: dict, ds) -> dict:
    """Cell figures of both splits and the test patients, as a training run reports them."""
    names = class_names_of(ds)
    return {
        "validation": final_evaluation.cell_metrics(val, names),
        "test": final_evaluation.cell_metrics(test, names),
        "test_patient": final_evaluation.test_patient_metrics(ds, val, test),
    }


def combine(
    member_dirs, workdir: str, *, data_dir: str | None = None, slide_prior: bool = True
) -> dict:
    """Writes the ensemble run of `member_dirs` to `workdir` and returns its report.

    Args:
      member_dirs: finished training runs (two or more) of the same data, seed and split; each
        joins with the checkpoint its run evaluated (the best, as `load_run` restores it).
      workdir: the new run folder (must not hold a run yet).
      data_dir: where the members' `cell_images` lie now; default the first member's
        `config.data.dir`.
      slide_prior: report the cell and patient figures with each slide's prevalence in place
        of the training split's.

    Raises:
      ValueError: fewer than two members, members of different splits or questions, a workdir
        that holds a run, or data that are not the members' crops.
    """
    start = time.perf_counter()
    if os.path.exists(os.path.join(workdir, run_folder.CONFIG_JSON)):
        raise ValueError(f"{workdir} already holds a run: give a new --workdir")
    members = [run_folder.load_run(d) for d in member_dirs]
    configs = [m.config for m in members]
    manifests = [run_folder.read_manifest(d) for d in member_dirs]
    _check_members(member_dirs, manifests, configs)
    config = ensemble_config(member_dirs, configs, slide_prior=slide_prior)
    if data_dir:
        config.data.dir = os.path.abspath(data_dir)
    ds = data.load_dataset(config.data, config.seed)
    split = _other_split(ds.manifest, manifests[0])
    if split:
        raise ValueError(
            f"the {split} crops under {config.data.dir} are not the members' (manifest.json): "
            "give --data_dir, the folder the members were trained on"
        )

    variables = ensemble.combine_variables([jax.device_get(m.variables) for m in members])
    os.makedirs(workdir, exist_ok=True)
    run_folder.write_config(workdir, config)
    run_folder.write_manifest(workdir, ds)
    with run_folder.open_checkpoints(workdir, async_save=False) as ckpts:
        ckpts.save(0, variables, latest=True, best=True)
    classifier = run_folder.load_run(workdir)  # what every consumer will load

    batch = int(config.eval_batch_size)
    raw = {s: _outputs(classifier, getattr(ds, s), batch) for s in ("validation", "test")}
    prevalence = float(np.mean(ds.train.labels))
    ids = {"validation": ds.validation.slide_ids, "test": ds.test.slide_ids}
    plain = {s: _scored(raw[s], ids[s], None) for s in raw}
    with_prior = {s: _scored(raw[s], ids[s], prevalence) for s in raw}
    scored = with_prior if slide_prior else plain
    record = calibration.calibrate(
        raw["validation"]["log_odds"], raw["validation"]["labels"],
        raw["test"]["log_odds"], raw["test"]["labels"],
    )  # fmt: skip
    record.update(checkpoint="best", step=0)

    reports = [run_folder.read_report(d) for d in member_dirs]
    counts = params_lib.count_params(
        classifier.model, (1, classifier.image_size, classifier.image_size, 3), variables
    )
    combine_seconds = time.perf_counter() - start
    member_seconds = sum(r["training"].get("wall_seconds_this_run") or 0 for r in reports)
    result = {
        "config": config.to_dict(),
        "model": {
            "name": "ensemble",
            "members": [c.model.name for c in configs],
            "alpha": configs[0].model.alpha,
            "total_params": counts.total,
            "trainable_params": 0,
            "bn_momentum": configs[0].model.bn_momentum,
        },
        "data": {
            "source": config.data.source,
            "image_size": int(config.data.image_size),
            "split_by": ds.manifest.get("split_by"),
            "num_train": len(ds.train),
            "num_validation": len(ds.validation),
            "num_test": len(ds.test),
        },
        "training": {
            **{k: reports[0]["training"][k] for k in ("epochs", "batch_size", "total_steps")},
            "evaluated_checkpoint": "best",
            "evaluated_step": 0,
            "test_time_augmentation": classifier.test_time_augmentation,
            "members": [
                {
                    "run": c["run"],
                    **{
                        k: r["training"].get(k)
                        for k in ("total_steps", "evaluated_step", "wall_seconds_this_run")
                    },
                }
                for c, r in zip(config.ensemble.members, reports, strict=True)
            ],  # fmt: skip
            "platform": jax.devices()[0].platform,
            # The members' training commands and this combination, end to end.
            "wall_seconds_this_run": member_seconds + combine_seconds,
            "combine_seconds": combine_seconds,
        },
        "history": [],
        **_figures(scored["validation"], scored["test"], ds),
        "slide_prior": {
            "applied": bool(slide_prior),
            "train_prevalence": prevalence,
            "without": _figures(plain["validation"], plain["test"], ds),
            "with": _figures(with_prior["validation"], with_prior["test"], ds),
        },
        "members": [
            {
                "run": c["run"],
                "test": {k: r["test"][k] for k in ("accuracy", "auc")},
                "provenance": r.get("provenance"),
            }
            for c, r in zip(config.ensemble.members, reports, strict=True)
        ],  # fmt: skip
        "calibration": calibration.report_summary(record),
        "warnings": [w for r in reports for w in r.get("warnings", [])],
        "provenance": provenance.collect(manifest=ds.manifest),
    }
    test = scored["test"]
    run_folder.write_predictions(workdir, ds.test, test["probs"])
    run_folder.write_test_outputs(
        workdir, log_odds=raw["test"]["log_odds"], labels=test["labels"],
        slide_ids=ds.test.slide_ids, names=ds.test.names,
    )  # fmt: skip
    from mnres.reporting import report as report_lib  # plots; matplotlib only here

    test_raw = raw["test"]
    report_lib.write_run_calibration(workdir, record, test_raw["labels"], test_raw["log_odds"])
    sample = run_folder.read_calibration_sample(member_dirs[0])
    if sample is not None:
        run_folder.write_calibration_sample(workdir, sample)
    report_lib.write_report(workdir, result)
    return result
