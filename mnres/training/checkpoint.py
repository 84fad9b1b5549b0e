"""Train-state checkpoints with orbax's `CheckpointManager` (the one module that imports orbax).

A checkpoint is the plain dict `{params, batch_stats, opt_state, step, rng}`. Two managers live
under one directory: `latest/` (periodic, the last `keep` kept, used to resume) and `best/`
(the state with the best validation score so far, used for the final evaluation). Orbax writes
each step to a temporary folder and renames it when complete, so a process killed at any moment
leaves the previous checkpoints readable; with several processes it writes each array once.

A save that fails (a full disk, a write the file system refuses) raises `CheckpointWriteError`
naming the checkpoint that is complete; its temporary folder is never taken for a checkpoint
and the next `Checkpoints` on the directory deletes it.

Each step's folder holds `CHECKSUMS_JSON` (a sha256 of every array, written once the save is
complete): a restore that reads other bytes raises `CheckpointCorruptError` instead of giving a
model with silently wrong weights. Checkpoints without it (mnres 0.1) load unchecked.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import sys
import traceback
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from mnres import atomic_file

CHECKSUMS_JSON = "mnres_checksums.json"


def _orbax_errors_as_warnings(record: logging.LogRecord) -> bool:
    """Orbax's error records of a failed save (its own, and asyncio's of its tasks), each with
    a traceback from one of its threads, become one warning line: the failure is raised once, as
    `CheckpointWriteError` (or by the restore). `-v 1` keeps them as they are."""
    if record.levelno >= logging.ERROR and not absl_logging.vlog_is_on(1) and _is_orbax(record):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = " ".join(record.getMessage().split()), None
        record.exc_info = record.exc_text = None
    return True


def _is_orbax(record: logging.LogRecord) -> bool:
    inside = f"{os.sep}orbax{os.sep}"
    if inside in record.pathname:
        return True
    error = record.exc_info[1] if record.exc_info else None
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    if any(inside in frame.filename for frame in frames):
        return True
    # asyncio's "Future exception was never retrieved" of a write that tensorstore failed: the
    # error carries no Python frames, only the path of orbax's temporary checkpoint folder.
    return error is not None and f".orbax-checkpoint-tmp{os.sep}" in str(error)


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_orbax_errors_as_warnings)


def _quiet_closed_loops() -> None:
    """When a save fails, orbax's storage callbacks still fire into its closed event loops,
    each printing a traceback ('Event loop is closed', dozens of them): a hook drops those (the
    failure is raised once, as `CheckpointWriteError`) and passes any other to the previous one.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loops", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loops = True
    sys.unraisablehook = hook


def abstract_like(tree):
    """Shape/dtype/sharding structs of `tree`: the restore target that keeps its shardings."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the ones completed before it are intact."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's arrays are not the bytes saved (their checksums differ)."""


def checksums(tree) -> dict[str, list]:
    """{leaf path: [dtype, shape, sha256 of its bytes]} of the arrays of `tree` this process
    holds whole (the arrays of a multi-process run, held in parts, are left out)."""
    found = {}
    for path, leaf in jax.tree.leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            continue
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest = hashlib.sha256(array.tobytes()).hexdigest()
        found[jax.tree_util.keystr(path)] = [array.dtype.str, list(array.shape), digest]
    return found


def verify(tree, step_dir: str) -> None:
    """Raises CheckpointCorruptError if an array of the restored `tree` differs from the one
    saved in `step_dir` (by its `CHECKSUMS_JSON`; none: nothing to check, e.g. mnres 0.1).

    An array restored in another dtype or shape than saved (a restore into another target) is
    not compared.
    """
    path = os.path.join(step_dir, CHECKSUMS_JSON)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    for key, (dtype, shape, digest) in checksums(tree).items():
        if key in saved and saved[key][:2] == [dtype, shape] and saved[key][2] != digest:
            raise CheckpointCorruptError(
                _corrupt(step_dir, f"{key} does not match the checksum saved with it")
            )


# TensorStore's words for a chunk it cannot decode (zstd, its OCDBT database).
_UNREADABLE = re.compile(r"corrupt|decompress|checksum|DATA_LOSS", re.IGNORECASE)


def _corrupt(step_dir: str, why: str) -> str:
    step, directory = os.path.basename(step_dir), os.path.dirname(step_dir)
    return (
        f"the checkpoint at step {step} in {directory} is corrupt ({why}): delete {step_dir} to "
        "resume from the checkpoint before it, or delete the run folder to start over"
    )


def complete_steps(directory: str) -> list[int]:
    """Steps with a complete checkpoint in a manager's `directory`, in order.

    Orbax writes a step to `STEP.orbax-checkpoint-tmp*` and renames it to `STEP` once every
    file is written, so only plain step numbers count.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


class Checkpoints:
    """Periodic (`latest/`) and best-by-validation (`best/`) checkpoints of a train state."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        _quiet_closed_loops()  # before any save
        # {manager name: (step, checksums)} of the save in flight, written once it is complete.
        self._pending: dict[str, tuple[int, dict]] = {}

        def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                # Left behind by a process killed mid-save; never a valid checkpoint.
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
                async_options=ocp.AsyncOptions(
                    post_finalization_callback=lambda: self._write_checksums(name)
                )
                if async_save
                else None,
            )
            return ocp.CheckpointManager(os.path.join(self.directory, name), options=options)

        self.latest = manager("latest", keep)
        self.best = manager("best", 1)
        self._async = async_save
        self._in_flight: int | None = None  # the step of the last asynchronous save
        self._failed = False  # a write failed: close() then only cleans up

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def save(self, step: int, state: dict, *, latest: bool = True, best: bool = False) -> None:
        """Saves `state` at `step` (asynchronously) as the latest and/or the best checkpoint.

        Raises:
          CheckpointWriteError: this save failed, or the asynchronous one before it did.
        """
        managers = {"latest": self.latest} if latest else {}
        managers.update({"best": self.best} if best else {})
        sums = None
        for name, manager in managers.items():
            # After a resume the same step may already be there (written before the kill):
            # training is deterministic, so it holds the same state.
            if step in manager.all_steps():
                continue
            try:
                # What orbax's save does first; here a failed earlier save is named as such.
                manager.wait_until_finished()
            except Exception as e:
                raise self._write_error(e, self._in_flight) from e
            sums = checksums(state) if sums is None else sums  # before training moves on
            self._pending[name] = (step, sums)
            try:
                manager.save(step, args=ocp.args.StandardSave(state), force=True)
                if not self._async:
                    self._write_checksums(name)
            except Exception as e:
                raise self._write_error(e, step) from e
            self._in_flight = step if self._async else None

    def _write_checksums(self, name: str) -> None:
        """Writes the checksums of manager `name`'s save, its arrays written, into its step's
        folder (process 0; an asynchronous save calls it from orbax's thread)."""
        step, sums = self._pending.pop(name)
        folder = os.path.join(self.directory, name)
        # Orbax calls back before it renames the step's temporary folder: the checksums are then
        # part of the step's atomic commit.
        temporary = glob.glob(os.path.join(glob.escape(folder), f"{step}.orbax-checkpoint-tmp*"))
        step_dir = temporary[0] if len(temporary) == 1 else os.path.join(folder, str(step))
        if jax.process_index() == 0:
            text = json.dumps(sums, sort_keys=True) + "\n"
            atomic_file.write_text(os.path.join(step_dir, CHECKSUMS_JSON), text)

    def restore(self, target: dict | None, *, step: int | None = None, best: bool = False) -> dict:
        """Restores into the structure, dtypes and shardings of `target` (arrays or structs);
        `target=None` gives the tree as saved (for tools that only read parameters).

        Raises:
          CheckpointCorruptError: an array differs from its checksum (`verify`).
        """
        manager = self.best if best else self.latest
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        abstract = None if target is None else abstract_like(target)
        step_dir = os.path.join(str(manager.directory), str(step))
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            # Flipped bytes inside a compressed chunk fail in TensorStore's decoder before any
            # checksum is compared: the same one line as a checksum that differs.
            if not _UNREADABLE.search(str(e)):
                raise
            raise CheckpointCorruptError(_corrupt(step_dir, "its data cannot be decoded")) from e
        verify(restored, step_dir)
        return restored

    def wait(self) -> None:
        """Blocks until every asynchronous save is on disk.

        Raises:
          CheckpointWriteError: a save in flight failed.
        """
        try:
            self.latest.wait_until_finished()
            self.best.wait_until_finished()
        except Exception as e:
            raise self._write_error(e, self._in_flight) from e
        self._in_flight = None

    def close(self) -> None:
        """Waits for pending saves and stops the managers.

        Raises:
          CheckpointWriteError: a pending save failed (not again after one was raised).
        """
        errors = []
        for manager in (self.latest, self.best):
            try:
                manager.close()
            except Exception as e:  # noqa: BLE001 - reported below, after both are closed
                errors.append(e)
        if errors and not self._failed:
            raise self._write_error(errors[0], self._in_flight) from errors[0]

    def _write_error(self, error: Exception, step: int | None) -> CheckpointWriteError:
        """The one-line error of a failed save, naming the checkpoint a re-run resumes from."""
        self._failed = True
        # The writer coroutines this save left unawaited would warn at exit, two lines each.
        warnings.filterwarnings(
            "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
        )
        latest = os.path.join(self.directory, "latest")
        steps = complete_steps(latest)
        kept = (
            f"the checkpoint at step {steps[-1]} in {latest} is complete and a re-run with the "
            "same workdir resumes from it"
            if steps
            else "no checkpoint was complete yet, so a re-run starts over"
        )
        cause = " ".join(str(error).split())  # one line, whatever the writer said
        return CheckpointWriteError(
            f"cannot write the checkpoint at step {step} in {self.directory} "
            f"({type(error).__name__}: {cause}); {kept}. Free disk space or fix the file "
            "system, then re-run."
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
