"""Multi-process runs: joining and leaving `jax.distributed`, and which process is the chief."""

from __future__ import annotations

import jax


def initialize_distributed(config) -> None:
    """`jax.distributed.initialize()` from `config.distributed`; call it before any JAX work.

    With `enabled` and nothing else set, JAX finds the coordinator itself (TPU pod slices,
    SLURM, Kubernetes); `coordinator_address`, `num_processes` and `process_id` set it by hand
    (e.g. two CPU processes on localhost).
    """
    dist = config.distributed
    if not dist.enabled:
        return
    if dist.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=dist.coordinator_address,
        num_processes=dist.num_processes,
        process_id=dist.process_id,
    )


def shutdown_distributed(config) -> None:
    """Leaves a run started by `initialize_distributed`; call it when the work is done.

    Every process then meets at JAX's shutdown barrier while all are still alive. Left to the
    interpreter's exit, a process can reach that barrier late (its exit first joins the
    threads still running) and the others abort after the barrier's timeout.
    """
    if config.distributed.enabled:
        jax.distributed.shutdown()


def is_chief() -> bool:
    """Whether this is process 0, the one that writes the run folder and logs for the run."""
    return jax.process_index() == 0
