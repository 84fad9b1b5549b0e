"""The fit loop: `train_and_evaluate(config, workdir)` trains, checkpoints, resumes and reports.

What it writes to `workdir` (file names and formats: `mnres.run_folder`): `config.json` (the
resolved config), `manifest.json` (the split manifest), `metrics.jsonl` (one row per epoch),
`checkpoints/{latest,best}/`, with `config.tensorboard` event files in `tensorboard/`
(`mnres.training.tensorboard`), and at the end `report.json`, `report.md`, `history.png`;
with a test split `predictions_test.csv`, `test_outputs.npz` (test log-odds, labels, slide
ids, names), `confusion_matrix.png` and `roc.png`; with a validation split `calibration.json`
(temperature, thresholds for 95%/98% specificity; see `mnres.metrics.calibration`), with its
reliability diagrams when there is a test split. Re-running with the same workdir
resumes from the latest checkpoint; because the data order and every random draw are functions
of (seed, step), a run killed at any moment and resumed ends with the same metrics as one that
was never stopped.

The phases, in order: `_create_run` (folder, data, model, optimizer, fresh state),
`_restore_or_start` (resume from a checkpoint or load pretrained weights), `_fit` (per epoch:
`_train_epoch`, then `_end_epoch`: validate, log, checkpoint), then
`mnres.training.final_evaluation`: the chosen checkpoint on validation and test, the report
and the outputs. Every phase reads and updates one `Run`.

A run that cannot give a usable model says so: an unset `config.model.bn_momentum` is picked
from the step count (`mnres.training.bn_momentum`), a set one that cannot follow the run is
warned about, and report.json's `warnings` (one log line too) name a model that gives one
output for every crop, validates no better than the class prior, or trained 0 steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from mnres import config as config_lib
from mnres import data, models, run_folder, workdir_lock
from mnres.data.splits import class_names_of
from mnres.models import params as params_lib
from mnres.training import (
    bn_momentum,
    checkpoint,
    distill,
    distributed,
    optim,
    progress,
    steps,
    tensorboard,
)
from mnres.training.steps import TrainState
from mnres.weights import transfer

# Every field of the run folder that measures time (metrics.jsonl rows, report.json "training"):
# the only ones that differ between two runs of one command on one machine.
TIMING_FIELDS = (
    "images_per_sec", "data_wait_fraction", "epoch_time_s", "eval_time_s",
    "train_seconds_this_run", "wall_seconds_this_run", "earlier_epochs_seconds",
)  # fmt: skip


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the checkpoints before it are intact."""


@dataclasses.dataclass
class Run:
    """One training run: its config, data, model and the state every phase updates."""

    config: ml_collections.ConfigDict
    workdir: str
    ds: data.Dataset
    model: nn.Module
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    ckpts: checkpoint.Checkpoints
    state: TrainState
    history: list[dict] = dataclasses.field(default_factory=list)
    # The host's copy of state.step: reading the device's each step would wait for it.
    step: int = 0
    # The latest checkpoint, named when training stops on a NaN.
    last_good_step: int | None = None
    best_val_accuracy: float = -math.inf
    # Whether the loop picked config.model.bn_momentum (the config left it None).
    bn_momentum_picked: bool = False
    # Found before training (e.g. a momentum too slow for the run); the report adds its own.
    warnings: list[str] = dataclasses.field(default_factory=list)
    # The chief's TensorBoard writer while `_fit` runs, with config.tensorboard; else None.
    board: tensorboard.Writer | None = None
    # The cross-validation fold this run is, if it is one ('{fold}' in config.distill.teacher).
    fold: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return data.steps_per_epoch(self.ds.train, self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs

    def non_finite(self, what: str, step: int) -> NonFiniteLossError:
        """The error that stops training at `step`, saying which checkpoint a re-run resumes."""
        kept = (
            f"the last good checkpoint (step {self.last_good_step}) in {self.ckpts.directory} is "
            "intact and a re-run resumes from it"
            if self.last_good_step
            else "no checkpoint had been written yet"
        )
        return NonFiniteLossError(
            f"Training stopped: {what} at step {step}. Nothing from this epoch was saved; {kept}. "
            "Lower config.optimizer.learning_rate, keep config.optimizer.grad_clip_norm > 0, or "
            "train in float32 (config.model.dtype='float32')."
        )


def _create_run(config, workdir: str, dataset: data.Dataset | None, validated: bool) -> Run:
    """Writes config.json and manifest.json; builds the model, optimizer and a fresh state."""
    if not validated:
        config_lib.validate(config)  # every field, before any work (ConfigError)
    config_lib.check_batch_size(config.batch_size)
    config_lib.check_batch_size(config.eval_batch_size, "config.eval_batch_size")
    ds = dataset if dataset is not None else data.load_dataset(config.data, config.seed)
    config_lib.check_train_split(config, ds)
    per_epoch = data.steps_per_epoch(ds.train, config.batch_size)
    # config.json holds the momentum trained with and the data's classes: the run reloads into
    # the same model.
    config, picked, warning = bn_momentum.resolve(config, per_epoch * config.num_epochs)
    config = config_lib.with_class_names(config, class_names_of(ds))
    # Before config.json is replaced: a re-run keeps the recipe it was trained with.
    run_folder.check_recipe(workdir, config)
    if distributed.is_chief():
        run_folder.write_config(workdir, config)
        run_folder.write_manifest(workdir, ds)
    # config.platform (e.g. tpu.py) names where the steps run: the formulation is chosen for it.
    model = models.from_config(
        transfer.model_config(config.model),
        num_classes=len(class_names_of(ds)),
        platform=config.platform,
    )
    mesh = steps.make_mesh()
    size = config.data.image_size
    shapes = params_lib.abstract_variables(model, (1, size, size, 3))
    tx, schedule = optim.create_optimizer(
        config.optimizer, model, shapes["params"], per_epoch, config.num_epochs
    )
    ema = config.ema_decay is not None
    state = steps.init_state(model, tx, size, config.seed, mesh, ema=ema)
    ckpts = checkpoint.Checkpoints(
        os.path.join(workdir, run_folder.CHECKPOINTS_DIR),
        keep=config.keep_checkpoints,
        # Several processes save synchronously: an asynchronous save's barrier, waited for in a
        # background thread, deadlocked against the next step's collectives (seen with two CPU
        # processes on gloo: one main thread at orbax's barrier, the other in an all-gather).
        async_save=config.async_checkpointing and jax.process_count() == 1,
    )
    run = Run(config, workdir, ds, model, mesh, tx, schedule, ckpts, state)
    run.bn_momentum_picked = picked
    run.warnings = [warning] if warning else []
    return run


def _restore_or_start(run: Run) -> None:
    """Resumes from the latest checkpoint (and its history), or starts from pretrained weights."""
    config, ckpts = run.config, run.ckpts
    start = ckpts.latest_step()
    if start is not None:
        run.state = TrainState.from_dict(ckpts.restore(run.state.to_dict()))
        logging.info("Resuming from the checkpoint at step %d in %s", start, ckpts.directory)
    else:
        run.state = transfer.warm_start(
            config.model, run.model, run.state, config.data.image_size, class_names_of(run.ds)
        )
    # Rows logged after the checkpoint are trained again: they are dropped from metrics.jsonl.
    run.history = run_folder.read_history(run.workdir, last_step=start or 0)
    if distributed.is_chief():
        run_folder.write_history(run.workdir, run.history)
    run.step = int(jax.device_get(run.state.step))
    run.last_good_step = start
    scored = [r for r in run.history if r.get("val_accuracy") is not None]
    best_row = max(scored, key=lambda r: r["val_accuracy"], default=None)  # the first of ties
    run.best_val_accuracy = best_row["val_accuracy"] if best_row else -math.inf
    # The best checkpoint of the resumed step is lost when its save failed or was killed after
    # latest/ was complete: it is the restored state, saved again (else another is evaluated).
    if best_row and best_row["step"] == start and (ckpts.best_step() or -1) < start:
        ckpts.save(start, run.state.to_dict(), latest=False, best=True)
    ds = run.ds
    logging.info(
        "%s: %d train / %d validation / %d test images, %d steps per epoch of %d, "
        "%d devices in %d processes",
        config.model.name, len(ds.train), len(ds.validation), len(ds.test), run.steps_per_epoch,
        config.batch_size, jax.device_count(), jax.process_count(),
    )  # fmt: skip


def _fit(run: Run, after_step: Callable[[int], None] | None) -> None:
    """Runs the remaining epochs, each trained, validated, logged and checkpointed."""
    config = run.config
    if run.step >= run.total_steps:
        return
    teacher = None
    if config.distill.teacher is not None:  # loaded only when there are steps to train
        teacher = distill.load(config.distill, run.fold)
        distill.check_unseen(teacher, run.ds, class_names_of(run.ds))
    train_step = steps.make_train_step(
        run.model,
        run.tx,
        config.data,
        run.mesh,
        label_smoothing=config.label_smoothing,
        generalized_ce_q=config.generalized_ce_q,
        ema_decay=config.ema_decay,
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        teacher=teacher,
    )
    eval_step = steps.make_eval_step(run.model, run.mesh)
    batch_size = config.batch_size
    batches = data.prefetch(
        data.train_batches(
            run.ds.train, batch_size, config.seed, run.step, jax.process_index(),
            jax.process_count(),
        )
    )  # fmt: skip
    bar = progress.bar(config, run.total_steps * batch_size, run.step * batch_size)
    try:
        if config.tensorboard and distributed.is_chief():
            run.board = tensorboard.Writer(
                os.path.join(run.workdir, run_folder.TENSORBOARD_DIR), run.step
            )
        while run.step < run.total_steps:
            epoch = run.step // run.steps_per_epoch
            bar.set_description(f"epoch {epoch + 1}/{config.num_epochs}")
            trained = _train_epoch(run, train_step, batches, bar, after_step)
            _end_epoch(run, eval_step, epoch, trained, bar)
    finally:
        bar.close()
        batches.close()  # stops the prefetch thread
        if run.board is not None:
            run.board.close()
            run.board = None


def _train_epoch(run: Run, train_step, batches, bar, after_step) -> dict:
    """Trains from `run.step` to the end of its epoch; returns the epoch's training figures."""
    batch_size = run.config.batch_size
    log_every = max(1, int(run.config.log_every_steps))
    epoch_end = (run.step // run.steps_per_epoch + 1) * run.steps_per_epoch
    first_step, wait, start = run.step, 0.0, time.perf_counter()
    accum = progress.StepMetrics()
    while run.step < epoch_end:
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        run.state, m = train_step(run.state, steps.shard_batch(batch, run.mesh))
        run.step += 1
        accum.add(run.step, m)
        bar.update(batch_size)
        if after_step is not None:
            after_step(run.step)
        if run.step % log_every == 0 or run.step == epoch_end:
            accum.drain(run)
            bar.set_postfix(loss=f"{accum.last_loss:.4f}", refresh=False)
            if run.board is not None:
                loss, images_per_sec = accum.since_mark()
                lr = float(run.schedule(run.step - 1))  # the rate of this step's update
                run.board.train(
                    run.step, loss=loss, learning_rate=lr, images_per_sec=images_per_sec
                )
    train_time = time.perf_counter() - start
    return {
        "train_loss": accum.loss_sum / accum.count,
        "train_accuracy": accum.correct / accum.count,
        "images_per_sec": (run.step - first_step) * batch_size / train_time,
        "data_wait_fraction": wait / train_time,
        "epoch_time_s": train_time,
    }


def _end_epoch(run: Run, eval_step, epoch: int, trained: dict, bar) -> None:
    """Validates the epoch's state, records its metrics.jsonl row, checkpoints if due."""
    t0 = time.perf_counter()
    val = None
    if len(run.ds.validation):
        val = steps.evaluate(
            eval_step, run.state, run.ds.validation, run.config.eval_batch_size, run.mesh
        )
        if not math.isfinite(val["loss"]):
            raise run.non_finite(f"the validation loss is {val['loss']}", run.step)
    row = {
        "epoch": epoch + 1,
        "step": run.step,
        "train_loss": trained["train_loss"],
        "train_accuracy": trained["train_accuracy"],
        "val_loss": val["loss"] if val else None,
        "val_accuracy": val["accuracy"] if val else None,
        "learning_rate": float(run.schedule(run.step - 1)),
        **{k: trained[k] for k in ("images_per_sec", "data_wait_fraction", "epoch_time_s")},
        "eval_time_s": time.perf_counter() - t0,
    }
    run.history.append(row)
    if distributed.is_chief():
        run_folder.append_history_row(run.workdir, row)
    if run.board is not None:
        run.board.epoch(row)  # flushed before the checkpoint
    bar.clear()  # the log line gets a line of its own, then the bar is redrawn
    logging.info(
        "epoch %d/%d step %d: train loss %.4f acc %.4f | val loss %s acc %s | "
        "lr %.2e | %.0f img/s, data wait %.0f%%",
        row["epoch"], run.config.num_epochs, run.step, row["train_loss"], row["train_accuracy"],
        _fmt(row["val_loss"]), _fmt(row["val_accuracy"]), row["learning_rate"],
        row["images_per_sec"], 100 * row["data_wait_fraction"],
    )  # fmt: skip
    bar.refresh()
    _checkpoint(run, epoch, val)


def _fmt(x):
    return "-" if x is None else f"{x:.4f}"


def _checkpoint(run: Run, epoch: int, val: dict | None) -> None:
    """Saves `latest` every `checkpoint_every_epochs` and at the end, `best` when val improves."""
    every_epochs = max(1, int(run.config.checkpoint_every_epochs))
    improved = val is not None and val["accuracy"] > run.best_val_accuracy
    if val:
        run.best_val_accuracy = max(run.best_val_accuracy, val["accuracy"])
    periodic = (epoch + 1) % every_epochs == 0 or run.step == run.total_steps
    if periodic or improved:
        run.ckpts.save(run.step, run.state.to_dict(), latest=periodic, best=improved)
        if periodic:
            run.last_good_step = run.step


def train_and_evaluate(
    config,
    workdir: str,
    *,
    after_step: Callable[[int], None] | None = None,
    dataset: data.Dataset | None = None,
    validated: bool = False,
    fold: int | None = None,
) -> dict:
    """Trains `config.model` on `config.data`, evaluates on the test split, writes `workdir`.

    Args:
      config: the experiment ConfigDict (`mnres.config.default_config()` with overrides).
      workdir: output folder: new, empty, or a run folder (resumed, or re-evaluated when only
        evaluation fields changed).
      after_step: called with the step number after every training step (tests use it to
        kill the process at a known step).
      dataset: the splits to use instead of `data.load_dataset(config.data, config.seed)`
        (e.g. one cross-validation fold, see `mnres.training.crossval`).
      validated: the caller has run `mnres.config.validate(config)` (the experiment commands
        do, before any other work); else it runs here, first.
      fold: the cross-validation fold this run is: it fills '{fold}' in
        `config.distill.teacher` (`mnres.training.distill`).

    Returns:
      The report dict (also written as report.json).

    Raises:
      NonFiniteLossError: the loss became NaN/inf; earlier checkpoints stay intact.
      workdir_lock.WorkdirBusyError: another live run holds `workdir` (its `.lock`).
      FileExistsError, PermissionError: `workdir` is not a folder to train into
        (`workdir_lock.claim`: it holds other files, is a file, or cannot be written).
      ConfigError: `workdir` holds a run of another recipe (`run_folder.check_recipe`).
    """
    started = time.perf_counter()
    # First of all: a folder that is not a run, or a live run's, stops here, before any write.
    with workdir_lock.lock(workdir):
        run = _create_run(config, workdir, dataset, validated)
        run.fold = fold
        try:
            return _train_and_report(run, after_step, started)
        finally:
            run.ckpts.close()  # waits for pending saves, so the last good checkpoint is complete


def _train_and_report(run: Run, after_step, started: float) -> dict:
    """Trains the remaining epochs, then evaluates, reports and writes the run's outputs."""
    # Here, not at the top: the reports' plotting (matplotlib, its font cache in HOME) is loaded
    # only by a run that gets this far, not by one refused at its start.
    from mnres.training import final_evaluation

    _restore_or_start(run)
    # The epochs earlier invocations trained (a run resumed from its checkpoint): the report
    # adds their time, so a resumed run's cost is the whole run's, not its last command's.
    earlier_seconds = run_folder.epochs_seconds(run.history)
    t0 = time.perf_counter()
    _fit(run, after_step)
    run.ckpts.wait()
    train_seconds = time.perf_counter() - t0
    trained = final_evaluation.TrainedRun(
        config=run.config, workdir=run.workdir, ds=run.ds, model=run.model, mesh=run.mesh,
        ckpts=run.ckpts, state=run.state, history=run.history, step=run.step,
        total_steps=run.total_steps, bn_momentum_picked=run.bn_momentum_picked,
        warnings=run.warnings, earlier_epochs_seconds=earlier_seconds,
    )  # fmt: skip
    return final_evaluation.finish(trained, train_seconds=train_seconds, started=started)
