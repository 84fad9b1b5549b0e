"""Train-state checkpoints with orbax's `CheckpointManager` (the one module that imports orbax).

A checkpoint is the plain dict `{params, batch_stats, opt_state, step, rng}`. Two managers live
under one directory: `latest/` (periodic, the last `keep` kept, used to resume) and `best/`
(the state with the best validation score so far, used for the final evaluation). Orbax writes
each step to a temporary folder and renames it when complete, so a process killed at any moment
leaves the previous checkpoints readable; with several processes it writes each array once.
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

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def save(self, step: int, state: dict, *, latest: bool = True, best: bool = False) -> None:
        """Saves `state` at `step` (asynchronously) as the latest and/or the best checkpoint."""
        managers = ([self.latest] if latest else []) + ([self.best] if best else [])
        for manager in managers:
            # After a resume the same step may already be there (written before the kill):
            # training is deterministic, so it holds the same state.
            if step not in manager.all_steps():
                manager.save(step, args=ocp.args.StandardSave(state), force=True)

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
        """Blocks until every asynchronous save is on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
