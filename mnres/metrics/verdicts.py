"""A verdict per slide (= patient): infected, not infected or insufficient, from its crops' scores.

A rule is data (`VerdictRule`, a JSON dict through ``to_dict``/``from_dict``), stored with a run
and with a shipped model. It counts a slide's confident crops, those with ``probs >= q``, and
decides by one of three kinds:

- ``'fraction'``: infected iff confident / cells > ``threshold``;
- ``'count'``: infected iff confident >= ``k``;
- ``'binomial'``: infected iff the one-sided binomial test of the confident count against the
  false-positive rate of a healthy slide's crops gives a p-value < ``alpha``.

A slide of fewer than ``min_cells`` crops is ``'insufficient'``. The rule also carries the crop
sensitivity and false-positive rate at ``q`` that it assumes (measured on validation crops):
they give each slide's Rogan-Gladen estimate and the rule's exact false-alarm and detection
probabilities at any slide size, with crops taken as independent draws.

Conventions are `mnres.metrics.cells`' (``probs`` = P(parasitized), checked inputs raising
ValueError, plain JSON values).
"""

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

from mnres.metrics.intervals import _check_correction, _is_int, rogan_gladen, rogan_gladen_interval

KINDS = ("fraction", "count", "binomial")
# The parameters each kind reads besides q, sensitivity, false_positive_rate and min_cells.
_KIND_PARAMS = {"fraction": ("threshold",), "count": ("k",), "binomial": ("alpha",)}
VERDICTS = ("infected", "not infected", "insufficient")


@dataclasses.dataclass(frozen=True)
class VerdictRule:
    """A slide rule and what it assumes of the model's crops (see the module docstring).

    Args:
      kind: 'fraction', 'count' or 'binomial'.
      sensitivity: P(p >= q) for a parasitized crop.
      false_positive_rate: P(p >= q) for a crop of an uninfected patient; < sensitivity.
      min_cells: a slide of fewer crops is 'insufficient'.
      q: a crop counts as confident iff p >= q (for 'fraction', the cell threshold).
      threshold: 'fraction' only, in [0, 1).
      k: 'count' only, >= 1.
      alpha: 'binomial' only, the significance in (0, 1).
    """

    kind: str
    sensitivity: float
    false_positive_rate: float
    min_cells: int
    q: float = 0.5
    threshold: float | None = None
    k: int | None = None
    alpha: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rule kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("threshold", "k", "alpha"):
            needed = name in _KIND_PARAMS[self.kind]
            if needed and getattr(self, name) is None:
                raise ValueError(f"a {self.kind!r} rule needs {name}")
            if not needed and getattr(self, name) is not None:
                raise ValueError(f"{name} is not a parameter of a {self.kind!r} rule")
        _check_correction(self.sensitivity, self.false_positive_rate)
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {self.q}")
        if not _is_int(self.min_cells) or self.min_cells < 1:
            raise ValueError(f"min_cells must be an integer >= 1, got {self.min_cells!r}")
        if self.kind == "fraction" and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.kind == "count" and (not _is_int(self.k) or self.k < 1):
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if self.kind == "binomial" and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        """The rule as a JSON-able dict (every field; those the kind does not read are None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VerdictRule":
        """The rule of a ``to_dict`` dict; unknown keys raise ValueError."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown verdict rule fields: {unknown}")
        return cls(**data)


def _p_values(rule, confident, cells):
    """P(X >= confident) for X ~ Binomial(cells, rule's false-positive rate)."""
    return scipy.stats.binom.sf(np.asarray(confident) - 1, cells, rule.false_positive_rate)


def _infected(rule, confident, cells):
    """Whether each (confident, cells) count is called infected, ignoring min_cells."""
    confident = np.asarray(confident)
    if rule.kind == "fraction":
        return confident / cells > rule.threshold
    if rule.kind == "count":
        return confident >= rule.k
    return _p_values(rule, confident, cells) < rule.alpha


def _min_confident(rule, n_cells):
    """The fewest confident crops that make a slide of n_cells infected; None if none do.

    Every kind is monotone in the count, so the verdict is "infected iff count >= this".
    """
    called = np.nonzero(_infected(rule, np.arange(n_cells + 1), n_cells))[0]
    return int(called[0]) if called.size else None


def _check_probs(probs):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 1 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty 1-D array, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError("probs must be probabilities in [0, 1], NaN-free")
    return probs


def _check_ids(slide_ids, n):
    # tfds hands strings over as bytes.
    ids = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in slide_ids])
    if ids.shape != (n,):
        raise ValueError(f"slide_ids shape {ids.shape} != probs shape ({n},)")
    return ids


def slide_verdicts(
    probs: ArrayLike,
    slide_ids: Iterable[str | bytes],
    rule: VerdictRule,
    cell_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """The verdict of each slide, with its evidence, sorted by slide id.

    Crops with an unknown slide id ('') are left out, as in `mnres.metrics.slides`: they may
    come from different patients, and pooling them would make a slide no patient has. A list
    with no known slide id gives [].

    The estimate is the parasitized fraction among the crops given, corrected by Rogan-Gladen
    for the rule's sensitivity and false-positive rate; it is not the patient's parasitaemia
    (the NIH release is a class-balanced selection of a slide's cells, not every cell).

    Args:
      probs: float [N], P(parasitized) of each crop.
      slide_ids: [N] slide (patient) ids, str or bytes.
      rule: the `VerdictRule`.
      cell_threshold: a crop is counted as called parasitized iff p >= this (shown, not used
        by the verdict, which counts crops with p >= rule.q).

    Returns:
      list of dicts: slide_id, cells, called, confident (crops with p >= rule.q),
      called_fraction, observed_fraction (confident / cells), estimate, estimate_low,
      estimate_high (Rogan-Gladen of observed_fraction with the Wilson 95% interval mapped
      through it), p_value (binomial rules; else None) and verdict ('infected', 'not infected'
      or 'insufficient': fewer than rule.min_cells crops).
    """
    probs = _check_probs(probs)
    ids = _check_ids(slide_ids, probs.shape[0])
    if not 0.0 <= cell_threshold <= 1.0:
        raise ValueError(f"cell_threshold must be in [0, 1], got {cell_threshold}")
    known = ids != ""
    slides, index = np.unique(ids[known], return_inverse=True)
    # Counted per slide at once (bincount), so that thousands of slides cost one pass.
    cells = np.bincount(index, minlength=slides.size)
    called = np.bincount(index, weights=probs[known] >= cell_threshold, minlength=slides.size)
    confident = np.bincount(index, weights=probs[known] >= rule.q, minlength=slides.size)
    called, confident = called.astype(np.int64), confident.astype(np.int64)
    infected = _infected(rule, confident, cells)
    p_values = _p_values(rule, confident, cells) if rule.kind == "binomial" else None
    return [
        _row(
            rule,
            str(slide),
            int(cells[i]),
            int(called[i]),
            int(confident[i]),
            bool(infected[i]),
            None if p_values is None else float(p_values[i]),
        )
        for i, slide in enumerate(slides)
    ]


def _row(rule, slide_id, cells, called, confident, infected, p_value):
    """One slide's row of `slide_verdicts`."""
    sens, fpr = rule.sensitivity, rule.false_positive_rate
    low, high = rogan_gladen_interval(confident, cells, sens, fpr)
    if cells < rule.min_cells:
        verdict = "insufficient"
    else:
        verdict = "infected" if infected else "not infected"
    return {
        "slide_id": slide_id,
        "cells": cells,
        "called": called,
        "confident": confident,
        "called_fraction": called / cells,
        "observed_fraction": confident / cells,
        "estimate": rogan_gladen(confident / cells, sens, fpr),
        "estimate_low": low,
        "estimate_high": high,
        "p_value": p_value,
        "verdict": verdict,
    }


def _check_n_cells(n_cells):
    if not _is_int(n_cells) or n_cells < 0:
        raise ValueError(f"n_cells must be an integer >= 0, got {n_cells!r}")


def false_alarm_rate(
    rule: VerdictRule, n_cells: int, false_positive_rate: float | None = None
) -> float:
    """P(a healthy slide of n_cells crops is called infected), exactly (binomial).

    Each crop of a healthy slide is taken as confident with probability false_positive_rate,
    independently; a slide below rule.min_cells is 'insufficient', never infected (0.0).

    Args:
      rule: the `VerdictRule`.
      n_cells: crops on the slide.
      false_positive_rate: the crops' true rate; None: the rule's own.

    Returns:
      the probability, a float in [0, 1].
    """
    fpr = rule.false_positive_rate if false_positive_rate is None else false_positive_rate
    return detection_probability(rule, n_cells, 0.0, 1.0, fpr)


def detection_probability(
    rule: VerdictRule,
    n_cells: int,
    fraction: float,
    sensitivity: float | None = None,
    false_positive_rate: float | None = None,
) -> float:
    """P(a slide of n_cells crops, a share ``fraction`` of them parasitized, is called infected).

    Each crop is confident independently with probability
    fraction * sensitivity + (1 - fraction) * false_positive_rate; a slide below
    rule.min_cells is 'insufficient', never infected (0.0).

    Args:
      rule: the `VerdictRule`.
      n_cells: crops on the slide.
      fraction: the true parasitized fraction of its crops, in [0, 1].
      sensitivity, false_positive_rate: the crops' true rates at rule.q; None: the rule's own.

    Returns:
      the probability, a float in [0, 1].
    """
    _check_n_cells(n_cells)
    sens = rule.sensitivity if sensitivity is None else sensitivity
    fpr = rule.false_positive_rate if false_positive_rate is None else false_positive_rate
    for name, value in (("fraction", fraction), ("sensitivity", sens), ("fpr", fpr)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if n_cells < rule.min_cells:
        return 0.0
    k = _min_confident(rule, n_cells)
    if k is None:
        return 0.0
    per_crop = fraction * sens + (1.0 - fraction) * fpr
    return float(scipy.stats.binom.sf(k - 1, n_cells, per_crop))
