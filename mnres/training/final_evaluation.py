"""The end of a run: the chosen checkpoint on validation and test, its report and outputs.

A run without a test split (a final run: `config.data.split_fractions` (0.9, 0.1, 0.0), every
slide trains but the validation slides, which choose the checkpoint and fit the calibration)
is evaluated on validation only: its report has no test figures and says why, and it writes no
test outputs; its held-out figures come from cross-validation of its recipe.

`mnres.training.loop.train_and_evaluate` calls `finish` once training is done, with the
`TrainedRun` it read off its run; everything is written through `mnres.run_folder`, the report
by `mnres.reporting.report.build_report`. Two classes (the malaria pair, or any pair with class
1 as the positive class) get the binary report: threshold metrics, ROC, patient level,
operating points. More classes get accuracy, per-class precision and recall, the confusion
matrix and the macro one-vs-rest AUC (`mnres.metrics.multiclass`), and a temperature without
operating points.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from mnres import data, metrics, run_folder
from mnres.config.schema import MALARIA_CLASSES
from mnres.data import sample
from mnres.data.splits import class_names_of
from mnres.metrics import calibration as calibration_lib
from mnres.metrics import multiclass, verdict_fitting
from mnres.models import params as params_lib
from mnres.reporting import plots, report
from mnres.training import checkpoint, steps
from mnres.training.steps import TrainState


@dataclasses.dataclass
class TrainedRun:
    """What the end of a run reads of the loop's run: its parts and how its training went."""

    config: ml_collections.ConfigDict
    workdir: str
    ds: data.Dataset
    model: nn.Module
    mesh: jax.sharding.Mesh
    ckpts: checkpoint.Checkpoints
    state: TrainState  # the last trained state
    history: list[dict]  # metrics.jsonl's rows
    step: int  # the host's copy of state.step
    total_steps: int
    bn_momentum_picked: bool  # the loop picked config.model.bn_momentum (the config left it None)
    warnings: list[str]  # found before training (e.g. a momentum too slow for the run)
    earlier_epochs_seconds: float = 0.0  # the epochs of the history earlier invocations trained


def finish(run: TrainedRun, *, train_seconds: float, started: float) -> dict:
    """Evaluates, reports and writes the outputs of a trained run; returns its report.

    Args:
      run: the trained run.
      train_seconds: how long this command trained.
      started: `time.perf_counter()` when the command started (before loading the data).
    """
    evaluation = evaluate_checkpoint(run)
    wall_seconds = time.perf_counter() - started
    calibrated = calibrate(evaluation)
    result = build_report(
        run, evaluation, calibrated, train_seconds=train_seconds, wall_seconds=wall_seconds
    )
    log_warnings(result["warnings"])
    write_outputs(run, result, evaluation, calibrated)
    return result


@dataclasses.dataclass
class Evaluation:
    """The evaluated checkpoint's outputs on validation and on test (None without the split)."""

    checkpoint: str  # 'best' or 'last'
    step: int
    tta: bool
    validation: dict | None
    test: dict | None


def evaluate_checkpoint(run: TrainedRun) -> Evaluation:
    """Evaluates the checkpoint `config.eval_checkpoint` names on validation and test."""
    config, ckpts, state = run.config, run.ckpts, run.state
    source = config.eval_checkpoint
    if source == "best" and ckpts.best_step() is not None:
        state = TrainState.from_dict(ckpts.restore(state.to_dict(), best=True))
        evaluated_step = ckpts.best_step()
    else:
        source, evaluated_step = "last", int(jax.device_get(state.step))
    # Test-time augmentation only here: per-epoch validation (checkpoint choice) stays one view.
    tta = bool(config.test_time_augmentation)
    eval_step = steps.make_eval_step(run.model, run.mesh, tta=tta)
    evaluate = lambda split: steps.evaluate(
        eval_step, state, split, config.eval_batch_size, run.mesh
    )
    val = evaluate(run.ds.validation) if len(run.ds.validation) else None
    test = evaluate(run.ds.test) if len(run.ds.test) else None
    return Evaluation(source, evaluated_step, tta, val, test)


def calibrate(evaluation: Evaluation) -> dict | None:
    """Temperature and operating points fitted on validation (None without validation),
    measured on test when there is one."""
    val, test = evaluation.validation, evaluation.test
    if not val:
        return None
    key = "log_odds" if "log_odds" in val else "logits"  # two classes: the exact log-odds
    test_args = (test[key], test["labels"]) if test else ()
    record = calibration_lib.calibrate(val[key], val["labels"], *test_args)
    record.update(checkpoint=evaluation.checkpoint, step=evaluation.step)
    return record


def build_report(
    run: TrainedRun,
    evaluation: Evaluation,
    calibrated: dict | None,
    *,
    train_seconds: float,
    wall_seconds: float,
) -> dict:
    """The report of a run (report.json): config, model, data, training, history, metrics."""
    config, model = run.config, run.model
    size = config.data.image_size
    counts = params_lib.count_params(model, (1, size, size, 3))
    sections = {
        "model": {
            "name": config.model.name,
            "alpha": config.model.alpha,
            "total_params": counts.total,
            "trainable_params": counts.trainable,
            "frozen_layers": list(model.frozen_layers),
            "bn_momentum": config.model.bn_momentum,
            "bn_momentum_picked": run.bn_momentum_picked,  # from the step count, config unset
        },
        "training": {
            "total_steps": run.total_steps,
            "epochs": config.num_epochs,
            "batch_size": config.batch_size,
            "evaluated_checkpoint": evaluation.checkpoint,
            "evaluated_step": evaluation.step,
            "test_time_augmentation": evaluation.tta,
            "train_seconds_this_run": train_seconds,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
            # Loading (and decoding) the data, training and evaluating: the command minus
            # start-up.
            "wall_seconds_this_run": wall_seconds,
            # Kept from earlier invocations of a resumed run: its epochs' training and
            # validation (`run_folder.whole_run_seconds` adds them to this command's).
            "earlier_epochs_seconds": run.earlier_epochs_seconds,
        },
        "history": run.history,
        # A model that cannot be used says so here (and in the log), not only in its numbers.
        "warnings": training_warnings(run, evaluation),
    }
    figures = report.figures(run.ds, evaluation.validation, evaluation.test)
    return report.build_report(config, run.ds, figures, calibrated, sections)


def training_warnings(run: TrainedRun, evaluation: Evaluation) -> list[str]:
    """What makes the run's model unusable: no training, one output for every crop, validation
    no better than always calling the majority class; plus the loop's own (`run.warnings`).

    Args:
      run: the finished run (its history, step, momentum and learning rate).
      evaluation: the evaluated checkpoint's outputs (validation, or test without validation).

    Returns:
      One sentence per finding, with its numbers and the likely fix; [] for a healthy run.
    """
    found, config = list(run.warnings), run.config
    if run.step == 0:
        found.append(
            f"The model trained 0 steps ({len(run.ds.train)} training crops, batch size "
            f"{config.batch_size}, {config.num_epochs} epochs): its outputs come from the random "
            "initialisation. Use more training crops, a smaller config.batch_size or more "
            "config.num_epochs."
        )
        return found
    val, names = evaluation.validation, class_names_of(run.ds)
    split, outputs = ("validation", val) if val else ("test", evaluation.test)
    spread = _collapse(outputs)
    fix = (
        "likely BatchNorm running statistics that lag the network (config.model.bn_momentum "
        f"{config.model.bn_momentum:g} over {run.total_steps} steps: leave it unset or lower "
        "it) or too high a learning rate (config.optimizer.learning_rate "
        f"{config.optimizer.learning_rate:g})"
    )
    if spread["collapsed"]:
        # Two classes: the spread of P(class 1); more: of the most-called class's probability.
        of = names[1] if len(names) == 2 else names[spread["called_class"]]
        found.append(
            f"The model gives nearly one output for every {split} crop (std of P({of}) "
            f"{spread['std']:.4f}, {100 * spread['called_share']:.1f}% called "
            f"{names[spread['called_class']]}): {fix}."
        )
    accuracies = [r["val_accuracy"] for r in run.history if r.get("val_accuracy") is not None]
    if val and accuracies:
        prior = _collapse(val)
        if max(accuracies) <= prior["prior"] + 1e-9:
            found.append(
                f"Validation accuracy never beat the class prior: best {max(accuracies):.4f} in "
                f"{len(accuracies)} epochs, {prior['prior']:.4f} for always calling "
                f"{names[prior['prior_class']]}: {fix}."
            )
    return found


def _collapse(outputs: dict) -> dict:
    """`output_collapse` of a split's outputs: on P(class 1) for two classes, else on all."""
    if "probs" in outputs:
        return metrics.output_collapse(outputs["labels"], outputs["probs"])
    return multiclass.output_collapse(outputs["labels"], multiclass.softmax(outputs["logits"]))


def log_warnings(warnings: list[str]) -> None:
    """One warning line in the log for all of a report's warnings (none for a healthy run)."""
    if warnings:
        logging.warning(
            "This run's model may be unusable (report.json 'warnings'): %s", " ".join(warnings)
        )


def write_verdict_rule(workdir: str, split, val: dict, train_prevalence: float, what: str):
    """Writes the slide verdict rule fitted on the validation slides
    (`verdict_fitting.rule_record`, plain P); nothing when the crops carry no slide ids or the
    slides cannot fit one (no uninfected or no infected validation patient with enough crops),
    said in the log."""
    if not np.any(np.asarray(split.slide_ids) != ""):
        logging.info("No slide verdict rule: the validation crops carry no slide ids.")
        return
    try:
        rule = verdict_fitting.rule_record(
            val["probs"], val["labels"], split.slide_ids, train_prevalence=train_prevalence,
            fitted_on=what,
        )  # fmt: skip
    except ValueError as e:
        logging.warning("No slide verdict rule: %s", e)
        return
    run_folder.write_json(os.path.join(workdir, run_folder.VERDICT_RULE_JSON), rule)


def _evaluated(evaluation: Evaluation) -> str:
    tta = ", 8-view test-time augmentation" if evaluation.tta else ""
    return f"checkpoint '{evaluation.checkpoint}' at step {evaluation.step}{tta}"


def write_outputs(run: TrainedRun, result: dict, evaluation: Evaluation, calibrated) -> None:
    """Writes the test predictions and outputs, calibration, plots and report (chief only);
    without a test split, the calibration, verdict rule, history and report."""
    if jax.process_index() != 0:
        return
    workdir, names = run.workdir, class_names_of(run.ds)
    binary = "probs" in (evaluation.test or evaluation.validation)
    if evaluation.test is not None:
        write_test_outputs(workdir, run.ds.test, evaluation.test, calibrated, result, names)
    elif calibrated:
        run_folder.write_calibration(workdir, calibrated)
    if binary and evaluation.validation is not None and names == MALARIA_CLASSES:
        write_verdict_rule(
            workdir, run.ds.validation, evaluation.validation,
            float(np.mean(run.ds.train.labels)),
            f"this run's validation split ({_evaluated(evaluation)})",
        )  # fmt: skip
    # int8 export calibrates on these crops, so it needs no training data later.
    run_folder.write_calibration_sample(workdir, sample.calibration_images(run.ds.train))
    plots.plot_history(run.history, os.path.join(workdir, run_folder.HISTORY_PNG))
    report.write_report(workdir, result)  # last: report.md links the plots written before it


def write_test_outputs(workdir, split, test: dict, calibrated, result: dict, names) -> None:
    """predictions.csv, the test outputs, the calibration with its test reliability plots, the
    test confusion matrix and ROC: what a run (or an ensemble of runs) leaves of its test split.

    Args:
      test: the split's outputs: "labels" and, for two classes, "probs" (P(class 1), as
        scored) and "log_odds" (before any slide prior); for more, "logits".
      calibrated: the calibration record, or None; result: the report (its test figures).
    """
    binary = "probs" in test
    # Two classes: P(class 1) and the log-odds; more: the softmax rows and the logits.
    probs = test["probs"] if binary else multiclass.softmax(test["logits"])
    scores = {"log_odds": test["log_odds"]} if binary else {"logits": test["logits"]}
    run_folder.write_predictions(workdir, split, probs, names)
    run_folder.write_test_outputs(
        workdir, **scores, labels=test["labels"], slide_ids=split.slide_ids, names=split.names
    )
    if calibrated:
        report.write_run_calibration(
            workdir, calibrated, test["labels"], next(iter(scores.values()))
        )
    path = lambda name: os.path.join(workdir, name)
    plots.plot_confusion_matrix(
        result["test"]["confusion_matrix"], path(run_folder.CONFUSION_MATRIX_PNG), names
    )
    if binary:
        plots.plot_roc(test["labels"], test["probs"], path(run_folder.ROC_PNG), class_names=names)
