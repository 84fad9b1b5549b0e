"""An ensemble run folder, combined from finished training runs of the same slide split.

`combine` writes a run folder whose model is an `mnres.models.Ensemble` of the members' evaluated
checkpoints (the mean of their logits; one member: that network itself, unwrapped, so one run
gets the slide-prior figures too), evaluated as a training run is: validation and test
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

from mnres import data, run_folder, workdir_lock
from mnres.config.schema import MALARIA_CLASSES
from mnres.data.splits import class_names_of
from mnres.metrics import calibration
from mnres.metrics import slide_prior as slide_prior_lib
from mnres.models import ensemble
from mnres.models import params as params_lib
from mnres.reporting import report
from mnres.training import checkpoint, final_evaluation

SPLITS = ("train", "validation", "test")
SCORED = ("validation", "test")  # the splits the ensemble is evaluated on


def _check_members(member_dirs, manifests, configs) -> None:
    """Raises ValueError unless every member saw the same crops in every split and answers
    the same question (classes, image size, test-time augmentation)."""
    if not member_dirs:
        raise ValueError("an ensemble run needs one finished run or more, got none")
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
    (`config.model.members`; one member keeps its own), and `config.ensemble` naming the
    members and their configs."""
    config = ml_collections.ConfigDict(configs[0].to_dict())
    with config.unlocked():
        if len(configs) > 1:
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
    logits = classifier.logits(split.images, batch_size=int(batch_size))
    return {"labels": np.asarray(split.labels), "log_odds": calibration.log_odds(logits)}


def _scores(classifier, ds, batch_size: int):
    """The ensemble's validation and test outputs: raw (log-odds), scored without and with each
    slide's prior, and the training prevalence that prior replaces. A split the members did not
    keep (a final run's test) is absent."""
    scored = [s for s in SCORED if len(getattr(ds, s))]
    raw = {s: _outputs(classifier, getattr(ds, s), batch_size) for s in scored}
    prevalence = float(np.mean(ds.train.labels))
    plain = {s: _scored(raw[s], getattr(ds, s).slide_ids, None) for s in scored}
    with_prior = {s: _scored(raw[s], getattr(ds, s).slide_ids, prevalence) for s in scored}
    return raw, plain, with_prior, prevalence


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


def combine(
    member_dirs, workdir: str, *, data_dir: str | None = None, slide_prior: bool = True
) -> dict:
    """Writes the ensemble run of `member_dirs` to `workdir` and returns its report.

    Args:
      member_dirs: finished training runs of the same data, seed and split; each joins with
        the checkpoint its run evaluated (the best, as `load_run` restores it). One run: its
        own network, scored again (with `slide_prior`, each slide's prevalence).
      workdir: the new run folder (must not hold a run yet).
      data_dir: where the members' `cell_images` lie now; default the first member's
        `config.data.dir`.
      slide_prior: report the cell and patient figures with each slide's prevalence in place
        of the training split's.

    Raises:
      ValueError: no member, members of different splits or questions, a workdir
        that holds a run, or data that are not the members' crops.
      FileExistsError, PermissionError: a workdir that holds other files, is a file or cannot
        be written (`mnres.workdir_lock.claim`).
    """
    start = time.perf_counter()
    if os.path.exists(os.path.join(workdir, run_folder.CONFIG_JSON)):
        raise ValueError(f"{workdir} already holds a run: give a new --workdir")
    members = [run_folder.load_run(d) for d in member_dirs]
    config, ds = _config_and_data(member_dirs, members, data_dir, slide_prior)
    variables = [jax.device_get(m.variables) for m in members]
    variables = ensemble.combine_variables(variables) if len(members) > 1 else variables[0]
    classifier = _write_run(workdir, config, ds, variables)

    raw, plain, with_prior, prevalence = _scores(classifier, ds, config.eval_batch_size)
    test = [raw["test"]["log_odds"], raw["test"]["labels"]] if "test" in raw else []
    record = calibration.calibrate(
        raw["validation"]["log_odds"], raw["validation"]["labels"], *test
    )
    record.update(checkpoint="best", step=0)

    reports = [run_folder.read_report(d) for d in member_dirs]
    figures = {
        "plain": report.figures(ds, plain["validation"], plain.get("test")),
        "with_prior": report.figures(ds, with_prior["validation"], with_prior.get("test")),
    }
    sections = {
        "model": _model_section(classifier, variables, [m.config for m in members]),
        "training": _training_section(
            classifier, config, reports, combine_seconds=time.perf_counter() - start
        ),
        "history": [],
        "slide_prior": {
            "applied": bool(slide_prior),
            "train_prevalence": prevalence,
            "without": figures["plain"],
            "with": figures["with_prior"],
        },
        "members": _members_section(config, reports),
        "warnings": [w for r in reports for w in r.get("warnings", [])],
    }
    chosen = figures["with_prior" if slide_prior else "plain"]
    result = report.build_report(config, ds, chosen, record, sections)
    if "test" in raw:
        scored = (with_prior if slide_prior else plain)["test"]
        test = {**raw["test"], "probs": scored["probs"]}  # the outputs keep the raw log-odds
        final_evaluation.write_test_outputs(
            workdir, ds.test, test, record, result, class_names_of(ds)
        )
    else:
        run_folder.write_calibration(workdir, record)
    sample = run_folder.read_calibration_sample(member_dirs[0])  # the first member's int8 sample
    if sample is not None:
        run_folder.write_calibration_sample(workdir, sample)
    if tuple(class_names_of(ds)) == MALARIA_CLASSES:
        final_evaluation.write_verdict_rule(
            workdir, ds.validation, plain["validation"], prevalence,
            "this ensemble's validation split (each member's best checkpoint)",
        )  # fmt: skip
    report.write_report(workdir, result)
    return result


def _write_run(workdir: str, config, ds, variables):
    """Writes the ensemble's config, manifest and only checkpoint; returns the run restored."""
    workdir_lock.claim(workdir)  # new, empty or marked: never a folder of a user's files
    run_folder.write_config(workdir, config)
    run_folder.write_manifest(workdir, ds)
    with checkpoint.Checkpoints(
        os.path.join(workdir, run_folder.CHECKPOINTS_DIR), async_save=False
    ) as ckpts:
        ckpts.save(0, variables, latest=True, best=True)
    return run_folder.load_run(workdir)  # what every consumer will load


def _config_and_data(member_dirs, members, data_dir, slide_prior: bool):
    """The ensemble's config and the members' data, checked to be one split of one question."""
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
    return config, ds


def _model_section(classifier, variables, configs) -> dict:
    """report.json's "model" of an ensemble: its members' networks and its parameters."""
    size = classifier.image_size
    counts = params_lib.count_params(classifier.model, (1, size, size, 3), variables)
    return {
        "name": "ensemble" if len(configs) > 1 else configs[0].model.name,
        "members": [c.model.name for c in configs],
        "alpha": configs[0].model.alpha,
        "total_params": counts.total,
        "trainable_params": 0,
        "bn_momentum": configs[0].model.bn_momentum,
    }


def _training_section(classifier, config, reports, *, combine_seconds: float) -> dict:
    """report.json's "training" of an ensemble: its members' runs and this combination."""
    member_seconds = sum(run_folder.whole_run_seconds(r["training"]) or 0 for r in reports)
    return {
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
    }


def _members_section(config, reports) -> list[dict]:
    """report.json's "members": each member's run, test figures and provenance."""
    return [
        {
            "run": c["run"],
            "test": {k: r["test"][k] for k in ("accuracy", "auc")} if r.get("test") else None,
            "provenance": r.get("provenance"),
        }
        for c, r in zip(config.ensemble.members, reports, strict=True)
    ]
