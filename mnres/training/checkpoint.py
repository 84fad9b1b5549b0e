"""Train-state checkpoints with orbax's `CheckpointManager` (the one module that imports orbax).

A checkpoint is the plain dict `{params, batch_stats, opt_state, step, rng}`. Two managers live
under one directory: `latest/` (periodic, the last `keep` kept, used to resume) and `best/`
(the state with the best validation score so far, used for the final evaluation). Orbax writes
each step to a temporary folder and renames it when complete, so a process killed at any moment
leaves the previous checkpoints readable; with several processes it writes each array once.

A save that fails (a full disk, a write the file system refuses) raises `CheckpointWriteError`
naming the checkpoint that is complete; its temporary folder is never taken for a checkpoint
and the next `Checkpoints` on the directory deletes it.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def abstract_like(tree):
    """Shape/dtype/sharding structs of `tree`: the restore target that keeps its shardings."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the ones completed before it are intact."""


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

        def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                # Left behind by a process killed mid-save; never a valid checkpoint.
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
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
        managers = ([self.latest] if latest else []) + ([self.best] if best else [])
        for manager in managers:
            # After a resume the same step may already be there (written before the kill):
            # training is deterministic, so it holds the same state.
            if step in manager.all_steps():
                continue
            try:
                # What orbax's save does first; here a failed earlier save is named as such.
                manager.wait_until_finished()
            except Exception as e:
                raise self._write_error(e, self._in_flight) from e
            try:
                manager.save(step, args=ocp.args.StandardSave(state), force=True)
            except Exception as e:
                raise self._write_error(e, step) from e
            self._in_flight = step if self._async else None

    def restore(self, target: dict | None, *, step: int | None = None, best: bool = False) -> dict:
        """Restores into the structure, dtypes and shardings of `target` (arrays or structs);
        `target=None` gives the tree as saved (for tools that only read parameters)."""
        manager = self.best if best else self.latest
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        abstract = None if target is None else abstract_like(target)
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))

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
