"""BatchNorm momentum that follows the run: picked from the step count when the config leaves it
unset, and a warning when a set one averages too slowly for the run.

Evaluation uses BatchNorm's running averages; if they average over more steps than the run has,
they still describe the first steps' network and the model can give one output for every crop.
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging

# Unset BatchNorm momentum: its averaging window, 1/(1 - m) steps, is 2% of the run, so the
# running statistics follow the network as it trains; clipped to [0.9, 0.99], which gives 0.99
# from 5,000 steps up (the full development set's 20 epochs are 5,560) and 0.9 below 500.
BN_WINDOW_FRACTION = 0.02
BN_MOMENTUM_RANGE = (0.9, 0.99)
# A momentum warns when the run is shorter than this many windows: the running statistics then
# still weigh the first steps' network (and their initial 0/1) by more than e**-5.
BN_MIN_WINDOWS = 5


def pick_bn_momentum(total_steps: int) -> float:
    """The BatchNorm momentum for a run of `total_steps` (`BN_WINDOW_FRACTION`, clipped).

    Args:
      total_steps: training steps of the whole run.

    Returns:
      The momentum, rounded to 4 decimals (0.99 at the full development set's 5,560 steps).
    """
    window = BN_WINDOW_FRACTION * total_steps
    momentum = 1.0 - 1.0 / window if window > 1 else 0.0
    return round(float(np.clip(momentum, *BN_MOMENTUM_RANGE)), 4)


def bn_momentum_warning(momentum: float, total_steps: int) -> str | None:
    """A sentence when `momentum` averages too slowly for `total_steps`; None when it follows.

    Args:
      momentum: the BatchNorm momentum the run trains with.
      total_steps: training steps of the whole run (0 steps: None, another warning says so).

    Returns:
      The warning (numbers and fix), or None.
    """
    window = 1.0 / (1.0 - momentum) if momentum < 1 else math.inf
    # The tolerance: 1 / (1 - 0.9) is 10.000000000000002 in floating point.
    if total_steps <= 0 or total_steps >= BN_MIN_WINDOWS * window * (1 - 1e-9):
        return None
    return (
        f"BatchNorm momentum {momentum:g} averages over ~{window:.0f} steps, too slow for this "
        f"run's {total_steps} training steps (it needs >= {BN_MIN_WINDOWS * window:.0f}): the "
        "running statistics used for evaluation lag the network, which can then give one "
        "output for every crop. Leave config.model.bn_momentum unset (None: picks "
        f"{pick_bn_momentum(total_steps):g} here) or set it <= "
        f"{1 - BN_MIN_WINDOWS / total_steps:.3f}."
    )


def resolve(config, total_steps: int):
    """`config` with `model.bn_momentum` set (picked when None), whether it was picked, and a
    warning when the momentum cannot follow `total_steps` (also logged)."""
    momentum = config.model.bn_momentum
    picked = momentum is None
    if picked:
        momentum = pick_bn_momentum(total_steps)
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.bn_momentum = momentum
    logging.info(
        "BatchNorm momentum %g (%s) for %d training steps",
        momentum, "picked from the step count" if picked else "config.model.bn_momentum",
        total_steps,
    )  # fmt: skip
    warning = bn_momentum_warning(momentum, total_steps)
    if warning:
        logging.warning("%s", warning)
    return config, picked, warning
