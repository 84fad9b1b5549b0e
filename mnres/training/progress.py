"""What a training run shows and checks as it goes: its step metrics and the progress bar."""

from __future__ import annotations

import math
import time

import jax

from mnres.training import distributed


class StepMetrics:
    """Per-step device metrics, fetched in bulk every few steps and checked for NaN/inf."""

    def __init__(self):
        self.pending: list[tuple[int, dict]] = []
        self.loss_sum = self.correct = self.count = 0.0
        self.last_loss = math.nan
        self.mark = (0.0, 0.0, time.perf_counter())  # loss sum, count, time of the last point

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def drain(self, run) -> None:
        """Fetches and adds up the pending steps; a NaN/inf raises `run.non_finite(...)`."""
        fetched = jax.device_get(self.pending)
        self.pending = []
        for step, m in fetched:
            loss = float(m["loss_sum"]) / float(m["count"])
            if not math.isfinite(loss):
                raise run.non_finite(f"the loss is {loss}", step)
            if not math.isfinite(float(m["grad_norm"])):
                # The loss was fine but the update was not: the parameters are now bad.
                raise run.non_finite(f"the gradient norm is {float(m['grad_norm'])}", step)
            self.loss_sum += float(m["loss_sum"])
            self.correct += float(m["correct"])
            self.count += float(m["count"])
            self.last_loss = loss

    def since_mark(self) -> tuple[float, float]:
        """The mean loss and images/s of the steps drained since the last call (or creation)."""
        loss_sum, count, then = self.mark
        self.mark = (self.loss_sum, self.count, time.perf_counter())
        images = self.count - count
        return (self.loss_sum - loss_sum) / images, images / (self.mark[2] - then)


def bar(config, total_images: int, initial_images: int):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI).
    enabled = config.progress_bar and distributed.is_chief()
    return tqdm(
        total=total_images,
        initial=initial_images,
        unit="img",
        unit_scale=True,
        smoothing=0.1,
        dynamic_ncols=True,
        disable=None if enabled else True,
    )
