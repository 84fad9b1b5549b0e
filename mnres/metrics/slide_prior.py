"""Each slide's own prevalence in place of the training set's: Bayes' rule, patient by patient.

A classifier scores every crop as if the cells around it came from its training set, where
about half the crops are parasitized. The crops of one slide come from one patient: most of a
heavily infected patient's cells are parasitized, none of an uninfected patient's. Replacing
the training prevalence pi by the slide's prevalence pi_s moves each crop's log-odds by
logit(pi_s) - logit(pi) (the prior-shift correction of Saerens et al. 2002, "Adjusting the
outputs of a classifier to new a priori probabilities"). pi_s is estimated by the fraction of
the slide's crops called parasitized (P >= 0.5), clipped to [CLIP, 1 - CLIP] so that no slide
is taken as certain of either class. A slide of fewer than MIN_CROPS crops says too little of
its patient and keeps its log-odds (every slide of the NIH development set has 65 or more).
Nothing is fitted: it needs only the crops' slide ids, which a patient's slide gives at
deployment too.
"""

from __future__ import annotations

import numpy as np

CLIP = 0.01
MIN_CROPS = 20


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def adjust(
    log_odds, slide_ids, train_prevalence: float, clip: float = CLIP, min_crops: int = MIN_CROPS
) -> np.ndarray:
    """Log-odds [N] of P(parasitized) with each slide's prevalence in place of the training one.

    Args:
      log_odds: float [N], the classifier's log-odds of each crop.
      slide_ids: [N] slide (patient) ids; crops with an unknown id ('') keep their log-odds.
      train_prevalence: the fraction of parasitized crops in the training split.
      clip: the estimated prevalence of a slide is kept in [clip, 1 - clip].
      min_crops: slides with fewer crops keep their log-odds.

    Returns:
      float64 [N] adjusted log-odds.

    Raises:
      ValueError: a training prevalence outside (0, 1), or arrays of different lengths.
    """
    if not 0.0 < train_prevalence < 1.0:
        raise ValueError(f"training prevalence must be in (0, 1), got {train_prevalence}")
    if not 0.0 < clip < 0.5:
        raise ValueError(f"clip must be in (0, 0.5), got {clip}")
    log_odds = np.asarray(log_odds, np.float64)
    slide_ids = np.array([str(s) for s in slide_ids])
    if len(slide_ids) != len(log_odds):
        raise ValueError(f"{len(log_odds)} log-odds for {len(slide_ids)} slide ids")
    adjusted = log_odds.copy()
    base = _logit(train_prevalence)
    for slide in np.unique(slide_ids[slide_ids != ""]):
        crops = slide_ids == slide
        if crops.sum() < min_crops:
            continue
        called = float(np.clip(np.mean(log_odds[crops] >= 0.0), clip, 1.0 - clip))
        adjusted[crops] += _logit(called) - base
    return adjusted
