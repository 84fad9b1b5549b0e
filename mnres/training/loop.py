"""The fit loop: `train_and_evaluate(config, workdir)` trains, checkpoints, resumes and reports.

What it writes to `workdir`: `config.json` (the resolved config), `manifest.json` (the split
manifest), `metrics.jsonl` (one row per epoch), `checkpoints/{latest,best}/`, and at the end
`report.json`, `report.md`, `predictions_test.csv`, `test_outputs.npz` (test log-odds, labels,
slide ids, names), the plots (`history.png`, `confusion_matrix.png`, `roc.png`) and, with a
validation split, `calibration.json` (temperature, thresholds for 95%/98% specificity; see
`mnres.calibration`) with its reliability diagrams. Re-running with the same workdir resumes
from the latest checkpoint; because the data order and every random draw are functions of
(seed, step), a run killed at any moment and resumed ends with the same metrics as one that
was never stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mnres import data, models
from mnres.evaluation import calibration, metrics, report
from mnres.models import params as params_lib
from mnres.training import checkpoint, optim, steps
from mnres.training.steps import TrainState

TEST_OUTPUTS_NPZ = "test_outputs.npz"
TIMING_FIELDS = ("images_per_sec", "data_wait_fraction", "epoch_time_s", "eval_time_s")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the checkpoints before it are intact."""


def initialize_distributed(config) -> None:
    """`jax.distributed.initialize()` from `config.distributed`; call it before any JAX work.

    With `enabled` and nothing else set, JAX finds the coordinator itself (TPU pod slices,
    SLURM, Kubernetes); `coordinator_address`, `num_processes` and `process_id` set it by hand
    (e.g. two CPU processes on localhost).
    """
    dist = config.get("distributed")
    if not dist or not dist.get("enabled"):
        return
    if dist.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=dist.get("coordinator_address"),
        num_processes=dist.get("num_processes"),
        process_id=dist.get("process_id"),
    )


def shutdown_distributed(config) -> None:
    """Leaves a run started by `initialize_distributed`; call it when the work is done.

    Every process then meets at JAX's shutdown barrier while all are still alive. Left to the
    interpreter's exit, a process can reach that barrier late (its exit first joins the
    threads still running) and the others abort after the barrier's timeout.
    """
    dist = config.get("distributed")
    if dist and dist.get("enabled"):
        jax.distributed.shutdown()


def _is_chief() -> bool:
    return jax.process_index() == 0


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def _load_history(path: str, last_step: int) -> list[dict]:
    """Rows of `metrics.jsonl` up to `last_step`; rows written after that checkpoint are dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] <= last_step]


def _model_config(model_config):
    """`config.model`, unfrozen when there are no pretrained weights to keep (logged)."""
    if model_config.get("freeze_through") and not model_config.get("pretrained"):
        logging.warning(
            "Training every layer: config.model.freeze_through=%r keeps layers at their "
            "pretrained values, but config.model.pretrained (a Keras weights file) is not set, "
            "so they would stay at their random initialisation.",
            model_config.freeze_through,
        )
        model_config = model_config.copy_and_resolve_references()
        with model_config.unlocked():
            model_config.freeze_through = None
    return model_config


def _load_pretrained(model_config, model, state: TrainState) -> TrainState:
    if not model_config.get("pretrained"):
        return state
    from mnres.models import keras_weights  # reads .h5 with h5py; only needed here

    variables, loaded = keras_weights.load_keras_weights(
        model, {"params": state.params, "batch_stats": state.batch_stats},
        model_config.pretrained,
    )  # fmt: skip
    logging.info("Pretrained weights from %s. %s", model_config.pretrained, loaded)
    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.batch_stats))
    params, batch_stats = jax.device_put((variables["params"], variables["batch_stats"]), shardings)
    ema_params = jax.tree.map(jnp.copy, params) if state.ema_params else {}
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema_params)


def _non_finite(what: str, step: int, last_good_step, checkpoint_dir) -> NonFiniteLossError:
    kept = (
        f"the last good checkpoint (step {last_good_step}) in {checkpoint_dir} is intact and a "
        "re-run resumes from it"
        if last_good_step
        else "no checkpoint had been written yet"
    )
    return NonFiniteLossError(
        f"Training stopped: {what} at step {step}. Nothing from this epoch was saved; {kept}. "
        "Lower config.optimizer.learning_rate, keep config.optimizer.grad_clip_norm > 0, or "
        "train in float32 (config.model.dtype='float32')."
    )


class _StepMetrics:
    """Per-step device metrics, fetched in bulk every few steps and checked for NaN/inf."""

    def __init__(self):
        self.pending: list[tuple[int, dict]] = []
        self.loss_sum = self.correct = self.count = 0.0
        self.last_loss = math.nan

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def drain(self, last_good_step: int | None, checkpoint_dir: str) -> None:
        fetched = jax.device_get(self.pending)
        self.pending = []
        for step, m in fetched:
            loss = float(m["loss_sum"]) / float(m["count"])
            if not math.isfinite(loss):
                raise _non_finite(f"the loss is {loss}", step, last_good_step, checkpoint_dir)
            if not math.isfinite(float(m["grad_norm"])):
                # The loss was fine but the update was not: the parameters are now bad.
                raise _non_finite(
                    f"the gradient norm is {float(m['grad_norm'])}", step, last_good_step,
                    checkpoint_dir,
                )  # fmt: skip
            self.loss_sum += float(m["loss_sum"])
            self.correct += float(m["correct"])
            self.count += float(m["count"])
            self.last_loss = loss


def _progress_bar(config, total_images: int, initial_images: int):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI).
    enabled = config.get("progress_bar", True) and _is_chief()
    return tqdm(
        total=total_images,
        initial=initial_images,
        unit="img",
        unit_scale=True,
        smoothing=0.1,
        dynamic_ncols=True,
        disable=None if enabled else True,
    )


def _fit(config, workdir, ds, model, state, mesh, tx, schedule, ckpts, history, after_step):
    """Runs the remaining epochs; returns the final state and the full history."""
    batch_size = config.batch_size
    per_epoch = data.steps_per_epoch(ds.train, batch_size)
    total = per_epoch * config.num_epochs
    step = int(jax.device_get(state.step))
    if step >= total:
        return state, history
    train_step = steps.make_train_step(
        model,
        tx,
        config.data,
        mesh,
        label_smoothing=config.get("label_smoothing", 0.0),
        ema_decay=config.get("ema_decay"),
    )
    eval_step = steps.make_eval_step(model, mesh)
    batches = data.prefetch(
        data.train_batches(
            ds.train, batch_size, config.seed, step, jax.process_index(), jax.process_count()
        )
    )
    history_path = os.path.join(workdir, "metrics.jsonl")
    best_val = max(
        (r["val_accuracy"] for r in history if r.get("val_accuracy") is not None), default=-math.inf
    )
    last_good = ckpts.latest_step()
    log_every = max(1, int(config.get("log_every_steps", 50)))
    every_epochs = max(1, int(config.get("checkpoint_every_epochs", 1)))
    bar = _progress_bar(config, total * batch_size, step * batch_size)
    try:
        while step < total:
            epoch = step // per_epoch
            bar.set_description(f"epoch {epoch + 1}/{config.num_epochs}")
            epoch_end = (epoch + 1) * per_epoch
            first_step, wait, start = step, 0.0, time.perf_counter()
            accum = _StepMetrics()
            while step < epoch_end:
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                state, m = train_step(state, steps.shard_batch(batch, mesh))
                step += 1
                accum.add(step, m)
                bar.update(batch_size)
                if after_step is not None:
                    after_step(step)
                if step % log_every == 0 or step == epoch_end:
                    accum.drain(last_good, ckpts.directory)
                    bar.set_postfix(loss=f"{accum.last_loss:.4f}", refresh=False)
            train_time = time.perf_counter() - start

            t0 = time.perf_counter()
            val = (
                steps.evaluate(eval_step, state, ds.validation, config.eval_batch_size, mesh)
                if len(ds.validation)
                else None
            )
            if val is not None and not math.isfinite(val["loss"]):
                raise _non_finite(
                    f"the validation loss is {val['loss']}", step, last_good, ckpts.directory
                )
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": accum.loss_sum / accum.count,
                "train_accuracy": accum.correct / accum.count,
                "val_loss": val["loss"] if val else None,
                "val_accuracy": val["accuracy"] if val else None,
                "learning_rate": float(schedule(step - 1)),
                "images_per_sec": (step - first_step) * batch_size / train_time,
                "data_wait_fraction": wait / train_time,
                "epoch_time_s": train_time,
                "eval_time_s": time.perf_counter() - t0,
            }
            history.append(row)
            if _is_chief():
                with open(history_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.clear()  # the log line gets a line of its own, then the bar is redrawn
            logging.info(
                "epoch %d/%d step %d: train loss %.4f acc %.4f | val loss %s acc %s | "
                "lr %.2e | %.0f img/s, data wait %.0f%%",
                row["epoch"], config.num_epochs, step, row["train_loss"], row["train_accuracy"],
                _fmt(row["val_loss"]), _fmt(row["val_accuracy"]), row["learning_rate"],
                row["images_per_sec"], 100 * row["data_wait_fraction"],
            )  # fmt: skip
            bar.refresh()
            improved = val is not None and val["accuracy"] > best_val
            best_val = max(best_val, val["accuracy"]) if val else best_val
            periodic = (epoch + 1) % every_epochs == 0 or step == total
            if periodic or improved:
                ckpts.save(step, state.to_dict(), latest=periodic, best=improved)
                last_good = step if periodic else last_good
    finally:
        bar.close()
        batches.close()  # stops the prefetch thread
    return state, history


def _fmt(x):
    return "-" if x is None else f"{x:.4f}"


def _write_predictions(path: str, split, probs) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "slide_id", "label", "prob_parasitized"])
        for row in zip(split.names, split.slide_ids, split.labels, probs, strict=True):
            writer.writerow([row[0], row[1], int(row[2]), f"{float(row[3]):.6f}"])


def _final_report(config, workdir, ds, model, state, mesh, ckpts, history, train_seconds, started):
    """Evaluates the chosen checkpoint on validation and test; writes report and plots."""
    source = config.get("eval_checkpoint", "best")
    if source == "best" and ckpts.best_step() is not None:
        state = TrainState.from_dict(ckpts.restore(state.to_dict(), best=True))
        evaluated_step = ckpts.best_step()
    else:
        source, evaluated_step = "last", int(jax.device_get(state.step))
    # Test-time augmentation only here: per-epoch validation (checkpoint choice) stays one view.
    tta = bool(config.get("test_time_augmentation", False))
    eval_step = steps.make_eval_step(model, mesh, tta=tta)
    evaluate = lambda split: steps.evaluate(eval_step, state, split, config.eval_batch_size, mesh)
    val = evaluate(ds.validation) if len(ds.validation) else None
    test = evaluate(ds.test)
    counts = params_lib.count_params(model, (1, config.data.image_size, config.data.image_size, 3))
    result = {
        "config": config.to_dict(),
        "model": {
            "name": config.model.name,
            "alpha": config.model.get("alpha"),
            "total_params": counts.total,
            "trainable_params": counts.trainable,
            "frozen_layers": list(model.frozen_layers),
        },
        "data": {
            "source": config.data.source,
            "image_size": config.data.image_size,
            "split_by": config.data.split_by,
            "num_train": len(ds.train),
            "num_validation": len(ds.validation),
            "num_test": len(ds.test),
        },
        "training": {
            "total_steps": data.steps_per_epoch(ds.train, config.batch_size) * config.num_epochs,
            "epochs": config.num_epochs,
            "batch_size": config.batch_size,
            "evaluated_checkpoint": source,
            "evaluated_step": evaluated_step,
            "test_time_augmentation": tta,
            "train_seconds_this_run": train_seconds,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
        },
        "history": history,
        "test": metrics.binary_metrics(test["labels"], test["probs"]),
        "validation": metrics.binary_metrics(val["labels"], val["probs"]) if val else None,
    }
    result["test"]["loss"] = test["loss"]
    # Loading (and decoding) the data, training and evaluating: the command minus start-up.
    result["training"]["wall_seconds_this_run"] = time.perf_counter() - started
    if val:
        result["validation"]["loss"] = val["loss"]
    known = lambda split: len(split) and all(s for s in split.slide_ids)
    if val and known(ds.validation) and known(ds.test):
        fraction = metrics.choose_fraction_threshold(
            val["labels"], val["probs"], ds.validation.slide_ids
        )
        result["test_patient"] = metrics.patient_metrics(
            test["labels"], test["probs"], ds.test.slide_ids, fraction
        )
    else:
        result["test_patient"] = None  # slide ids unknown (tfds) or no validation split
    # Temperature and operating points fitted on validation, stored with the model for predict.
    calibrated = None
    if val:
        calibrated = calibration.calibrate(
            val["log_odds"], val["labels"], test["log_odds"], test["labels"]
        )
        calibrated.update(checkpoint=source, step=evaluated_step)
        result["calibration"] = calibration.report_summary(calibrated)
    if _is_chief():
        _write_predictions(os.path.join(workdir, "predictions_test.csv"), ds.test, test["probs"])
        np.savez_compressed(
            os.path.join(workdir, TEST_OUTPUTS_NPZ),
            log_odds=test["log_odds"],
            labels=test["labels"],
            slide_ids=np.asarray(ds.test.slide_ids, str),
            names=np.asarray(ds.test.names, str),
        )
        if calibrated:
            calibration.write_run_calibration(workdir, calibrated, test["labels"], test["log_odds"])
        path = lambda name: os.path.join(workdir, name)
        report.plot_history(history, path(report.HISTORY_PNG))
        report.plot_confusion_matrix(
            result["test"]["confusion_matrix"], path(report.CONFUSION_MATRIX_PNG)
        )
        report.plot_roc(test["labels"], test["probs"], path(report.ROC_PNG))
        report.write_report(workdir, result)
    return result


def train_and_evaluate(
    config,
    workdir: str,
    *,
    after_step: Callable[[int], None] | None = None,
    dataset: data.Dataset | None = None,
) -> dict:
    """Trains `config.model` on `config.data`, evaluates on the test split, writes `workdir`.

    Args:
      config: the experiment ConfigDict (see experiments/configs/default.py).
      workdir: output folder; an existing one with checkpoints is resumed.
      dataset: the splits to use (e.g. one cross-validation fold); default: loaded from
        `config.data` with `config.seed`.
      after_step: called with the step number after every training step (tests use it to
        kill the process at a known step).
      dataset: the splits to use instead of `data.load_dataset(config.data, config.seed)`
        (cross-validation folds, see `mnres.crossval`).

    Returns:
      The report dict (also written as report.json).

    Raises:
      NonFiniteLossError: the loss became NaN/inf; earlier checkpoints stay intact.
    """
    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    steps.check_batch_size(config.batch_size)
    steps.check_batch_size(config.eval_batch_size, "config.eval_batch_size")
    if _is_chief():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    ds = dataset if dataset is not None else data.load_dataset(config.data, config.seed)
    if _is_chief():
        data.write_manifest(ds, os.path.join(workdir, "manifest.json"))
    model = models.from_config(_model_config(config.model))
    per_epoch = data.steps_per_epoch(ds.train, config.batch_size)
    mesh = steps.make_mesh()
    shapes = params_lib.abstract_variables(
        model, (1, config.data.image_size, config.data.image_size, 3)
    )
    tx, schedule = optim.create_optimizer(
        config.optimizer, model, shapes["params"], per_epoch, config.num_epochs
    )
    state = steps.init_state(
        model,
        tx,
        config.data.image_size,
        config.seed,
        mesh,
        ema=config.get("ema_decay") is not None,
    )
    ckpts = checkpoint.Checkpoints(
        os.path.join(workdir, "checkpoints"),
        keep=config.get("keep_checkpoints", 2),
        # Several processes save synchronously: an asynchronous save's barrier, waited for in a
        # background thread, deadlocked against the next step's collectives (seen with two CPU
        # processes on gloo: one main thread at orbax's barrier, the other in an all-gather).
        async_save=config.get("async_checkpointing", True) and jax.process_count() == 1,
    )
    try:
        start = ckpts.latest_step()
        if start is not None:
            state = TrainState.from_dict(ckpts.restore(state.to_dict()))
            logging.info("Resuming from the checkpoint at step %d in %s", start, ckpts.directory)
        else:
            state = _load_pretrained(config.model, model, state)
        history = _load_history(os.path.join(workdir, "metrics.jsonl"), start or 0)
        if _is_chief():
            with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in history)
        logging.info(
            "%s: %d train / %d validation / %d test images, %d steps per epoch of %d, "
            "%d devices in %d processes",
            config.model.name, len(ds.train), len(ds.validation), len(ds.test), per_epoch,
            config.batch_size, jax.device_count(), jax.process_count(),
        )  # fmt: skip
        t0 = time.perf_counter()
        state, history = _fit(
            config, workdir, ds, model, state, mesh, tx, schedule, ckpts, history, after_step
        )
        ckpts.wait()
        return _final_report(
            config, workdir, ds, model, state, mesh, ckpts, history, time.perf_counter() - t0,
            started,
        )  # fmt: skip
    finally:
        ckpts.close()  # waits for pending saves, so the last good checkpoint is complete
