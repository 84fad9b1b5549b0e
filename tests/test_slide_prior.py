"""The slide prior: each slide's prevalence in place of the training split's."""

import numpy as np
import pytest

from mnres import metrics
from mnres.metrics import slide_prior


def _logit(p):
    return np.log(p) - np.log1p(-p)


def test_each_slide_moves_by_its_called_fraction():
    log_odds = np.array([2.0, 1.0, 0.5, -1.0, -3.0, -2.0, -0.5, 0.3])
    slides = np.array(["A", "A", "A", "A", "B", "B", "B", ""])
    adjusted = slide_prior.adjust(log_odds, slides, train_prevalence=0.5, min_crops=1)
    # A: 3 of 4 crops called parasitized; B: none, so its prevalence is clipped to 0.01.
    np.testing.assert_allclose(adjusted[:4], log_odds[:4] + _logit(0.75))
    np.testing.assert_allclose(adjusted[4:7], log_odds[4:7] + _logit(slide_prior.CLIP))
    assert adjusted[7] == log_odds[7]  # no slide id: unchanged
    # Against a training split with 40% parasitized crops, the same slide moves further.
    again = slide_prior.adjust(log_odds, slides, train_prevalence=0.4, min_crops=1)
    np.testing.assert_allclose(again[:4], log_odds[:4] + _logit(0.75) - _logit(0.4))
    # A slide of fewer crops than min_crops says too little of its patient: unchanged.
    few = slide_prior.adjust(log_odds, slides, train_prevalence=0.5, min_crops=4)
    np.testing.assert_allclose(few[:4], adjusted[:4])
    np.testing.assert_array_equal(few[4:], log_odds[4:])
    assert slide_prior.MIN_CROPS == 20
    np.testing.assert_array_equal(slide_prior.adjust(log_odds, slides, 0.5), log_odds)


def test_it_helps_where_prevalence_differs_by_patient():
    """Crops scored with the balanced training prior; patients at 90%, 40% and 0% prevalence."""
    rng = np.random.default_rng(0)
    labels, log_odds, slides = [], [], []
    for slide, prevalence in (("heavy", 0.9), ("light", 0.4), ("healthy", 0.0)):
        y = rng.random(400) < prevalence
        x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
        labels.append(y.astype(int))
        log_odds.append(2.0 * x)  # the exact log-odds at prevalence 0.5
        slides += [slide] * 400
    labels, log_odds, slides = np.concatenate(labels), np.concatenate(log_odds), np.array(slides)
    adjusted = slide_prior.adjust(log_odds, slides, train_prevalence=0.5)
    before = metrics.binary_metrics(labels, 1 / (1 + np.exp(-log_odds)))
    after = metrics.binary_metrics(labels, 1 / (1 + np.exp(-adjusted)))
    assert after["accuracy"] > before["accuracy"] + 0.03
    assert after["auc"] > before["auc"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="prevalence"):
        slide_prior.adjust([0.0], ["A"], train_prevalence=1.0)
    with pytest.raises(ValueError, match="2 log-odds for 1 slide ids"):
        slide_prior.adjust([0.0, 1.0], ["A"], train_prevalence=0.5)
    with pytest.raises(ValueError, match="clip"):
        slide_prior.adjust([0.0], ["A"], train_prevalence=0.5, clip=0.5)
