"""Intervals of proportions (numpy/scipy only): Wilson's score interval and the Rogan-Gladen
correction of an observed fraction for a test's sensitivity and false-positive rate.
"""

import numpy as np
import scipy.stats


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion (Wilson 1927).

    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps a width at 0 and n
    successes, where slide counts often are.

    Args:
      successes: an integer in [0, n].
      n: trials, an integer >= 1.
      confidence: two-sided coverage, in (0, 1).

    Returns:
      (low, high), floats in [0, 1].
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not _is_int(successes) or not 0 <= successes <= n:
        raise ValueError(f"successes must be an integer in [0, n={n}], got {successes!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = float(scipy.stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clipped: at 0 or n successes the bound is 0 or 1 up to rounding.
    return float(max(center - half, 0.0)), float(min(center + half, 1.0))


def _check_correction(sensitivity, false_positive_rate):
    for name, value in (("sensitivity", sensitivity), ("false_positive_rate", false_positive_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if sensitivity <= false_positive_rate:
        raise ValueError(
            f"sensitivity {sensitivity} <= false-positive rate {false_positive_rate}: "
            "the observed fraction carries no information on the true one"
        )


def rogan_gladen(observed_fraction: float, sensitivity: float, false_positive_rate: float) -> float:
    """The true fraction estimated from an observed one (Rogan & Gladen 1978), clipped to [0, 1].

    observed = true * sensitivity + (1 - true) * false_positive_rate, solved for true. Both
    rates are taken as known.

    Args:
      observed_fraction: the share called positive, in [0, 1].
      sensitivity: P(called positive | positive), > false_positive_rate.
      false_positive_rate: P(called positive | negative).

    Returns:
      the estimated true fraction, a float in [0, 1].
    """
    if not 0.0 <= observed_fraction <= 1.0:
        raise ValueError(f"observed_fraction must be in [0, 1], got {observed_fraction}")
    _check_correction(sensitivity, false_positive_rate)
    estimate = (observed_fraction - false_positive_rate) / (sensitivity - false_positive_rate)
    return float(np.clip(estimate, 0.0, 1.0))


def rogan_gladen_interval(
    positives: int,
    n: int,
    sensitivity: float,
    false_positive_rate: float,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """The Wilson interval of positives / n mapped through `rogan_gladen` (monotone), clipped.

    The rates are taken as known: their own uncertainty is not in the interval.

    Returns:
      (low, high), floats in [0, 1].
    """
    _check_correction(sensitivity, false_positive_rate)
    low, high = wilson_interval(positives, n, confidence)
    return (
        rogan_gladen(low, sensitivity, false_positive_rate),
        rogan_gladen(high, sensitivity, false_positive_rate),
    )


def patient_bootstrap(statistic, infected, resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Percentile intervals of `statistic` with whole patients resampled with replacement.

    The crops of one patient are not independent draws (stain, smear and parasitaemia are
    shared), so an interval over crops is too narrow; this one resamples patients. They are
    drawn within the infected and within the uninfected patients, so that every resample keeps
    both classes (sensitivity, specificity and AUC stay defined).

    Args:
      statistic: pick -> {name: value}, `pick` an int array of patient indices (with repeats).
      infected: bool [P], each patient's truth.
      resamples, seed: the bootstrap's size and its generator's seed (same seed, same interval).
      confidence: two-sided coverage.

    Returns:
      {name: (low, high)}; NaN draws (a figure undefined in a resample) are left out.
    """
    infected = np.asarray(infected, bool)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(infected), np.flatnonzero(~infected)]
    picks = np.concatenate([rng.choice(g, (resamples, len(g))) for g in groups if len(g)], axis=1)
    draws = [statistic(pick) for pick in picks]
    tail = 100 * (1 - confidence) / 2
    return {
        name: tuple(
            float(x) for x in np.nanpercentile([d[name] for d in draws], [tail, 100 - tail])
        )
        for name in draws[0]
    }
