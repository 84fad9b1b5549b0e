"""Slide verdicts: the statistics against scipy and closed forms, and synthetic slides of known
parasitized fraction and size against the rates the rules predict."""

import json

import numpy as np
import pytest
import scipy.stats

from mnres import metrics
from mnres.metrics import VerdictRule

SENS, FPR, Q = 0.9, 0.03, 0.6
RULES = {
    "fraction": VerdictRule("fraction", SENS, FPR, min_cells=20, q=Q, threshold=0.06),
    "count": VerdictRule("count", SENS, FPR, min_cells=20, q=Q, k=4),
    "binomial": VerdictRule("binomial", SENS, FPR, min_cells=20, q=Q, alpha=0.05),
}


def _crops(rng, labels, sens=SENS, fpr=FPR, q=Q):
    """P(parasitized) per crop: >= q with probability sens (parasitized) or fpr (uninfected)."""
    confident = rng.random(labels.shape) < np.where(labels == 1, sens, fpr)
    return np.where(confident, rng.uniform(q, 1.0, labels.shape), rng.uniform(0.0, q, labels.shape))


def _slides(rng, n_slides, n_cells, fraction):
    """n_slides slides of n_cells crops, each parasitized with probability fraction."""
    labels = (rng.random(n_slides * n_cells) < fraction).astype(np.int64)
    names = np.array([f"s{i:05d}" for i in range(n_slides)])
    return _crops(rng, labels), np.repeat(names, n_cells), labels


# Wilson's interval and Rogan-Gladen.


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_interval_matches_scipy(confidence):
    for n in [1, 2, 7, 50, 333]:
        for x in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = scipy.stats.binomtest(x, n).proportion_ci(confidence, method="wilson")
            got = metrics.wilson_interval(x, n, confidence)
            assert got == pytest.approx((ci.low, ci.high), abs=1e-12), (x, n)


def test_wilson_interval_closed_form():
    # 3 of 10: (x + z^2/2) / (n + z^2) -+ z sqrt(x (n - x) / n + z^2 / 4) / (n + z^2)
    z = scipy.stats.norm.ppf(0.975)
    center = (3 + z * z / 2) / (10 + z * z)
    half = z * np.sqrt(3 * 7 / 10 + z * z / 4) / (10 + z * z)
    assert metrics.wilson_interval(3, 10) == pytest.approx((center - half, center + half))
    assert metrics.wilson_interval(0, 5)[0] == 0.0 and metrics.wilson_interval(5, 5)[1] == 1.0


def test_rogan_gladen_by_hand_and_clipped():
    assert metrics.rogan_gladen(0.1, 0.9, 0.02) == pytest.approx(0.08 / 0.88)
    assert metrics.rogan_gladen(0.5, 1.0, 0.0) == 0.5
    assert metrics.rogan_gladen(0.46, 0.9, 0.02) == pytest.approx(0.5)
    assert metrics.rogan_gladen(0.01, 0.9, 0.02) == 0.0  # below the false-positive rate
    assert metrics.rogan_gladen(0.95, 0.9, 0.02) == 1.0  # above the sensitivity


def test_rogan_gladen_interval_is_wilson_mapped():
    low, high = metrics.wilson_interval(8, 100)
    got = metrics.rogan_gladen_interval(8, 100, 0.9, 0.02)
    assert got == pytest.approx(((low - 0.02) / 0.88, (high - 0.02) / 0.88))
    high = metrics.wilson_interval(0, 100)[1]
    assert metrics.rogan_gladen_interval(0, 100, 0.9, 0.02) == (
        0.0,
        pytest.approx((high - 0.02) / 0.88),
    )
    assert metrics.rogan_gladen_interval(0, 100, 0.9, 0.05) == (0.0, 0.0)  # both below the FPR
    assert metrics.rogan_gladen_interval(100, 100, 0.9, 0.02)[1] == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.wilson_interval(1, 0),
        lambda: metrics.wilson_interval(4, 3),
        lambda: metrics.wilson_interval(-1, 3),
        lambda: metrics.wilson_interval(1.5, 3),
        lambda: metrics.wilson_interval(1, 3, confidence=1.0),
        lambda: metrics.rogan_gladen(0.1, 0.02, 0.02),
        lambda: metrics.rogan_gladen(0.1, 0.01, 0.02),
        lambda: metrics.rogan_gladen(1.1, 0.9, 0.02),
        lambda: metrics.rogan_gladen_interval(3, 10, 0.3, 0.4),
    ],
)
def test_bad_statistics_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


# The rule as data.


@pytest.mark.parametrize("kind", sorted(RULES))
def test_rule_round_trips_through_json(kind):
    rule = RULES[kind]
    again = VerdictRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert again == rule and again.to_dict() == rule.to_dict()


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "majority"},
        {"kind": "count", "k": None},
        {"kind": "count", "k": 0},
        {"kind": "count", "k": 2.5},
        {"kind": "count", "alpha": 0.05},  # not a count rule's parameter
        {"kind": "fraction", "k": None, "threshold": 1.0},
        {"kind": "binomial", "k": None, "alpha": 0.0},
        {"sensitivity": 0.03},  # sensitivity <= false-positive rate
        {"false_positive_rate": 0.95},
        {"false_positive_rate": -0.1},
        {"min_cells": 0},
        {"q": 0.0},
    ],
)
def test_bad_rules_raise(fields):
    data = {**RULES["count"].to_dict(), **fields}
    with pytest.raises(ValueError):
        VerdictRule.from_dict(data)


def test_unknown_rule_field_raises():
    with pytest.raises(ValueError, match="unknown"):
        VerdictRule.from_dict({**RULES["count"].to_dict(), "beta": 1})


# slide_verdicts.


def test_slide_of_three_crops_is_insufficient():
    rows = metrics.slide_verdicts([0.99, 0.98, 0.97], ["a"] * 3, RULES["count"])
    assert [r["verdict"] for r in rows] == ["insufficient"] and "insufficient" in metrics.VERDICTS
    assert rows[0]["cells"] == 3 and rows[0]["confident"] == 3


@pytest.mark.parametrize("kind", sorted(RULES))
def test_slide_verdicts_rows(kind):
    rule = RULES[kind]
    rng = np.random.default_rng(0)
    probs, ids, _ = _slides(rng, 30, 50, 0.05)
    probs, ids = (
        np.r_[probs, 0.99, 0.2],
        np.concatenate([ids, ["", ""]]),
    )  # unknown slides: left out
    rows = metrics.slide_verdicts(probs, [s.encode() for s in ids], rule, cell_threshold=0.5)
    json.dumps(rows, allow_nan=False)
    assert [r["slide_id"] for r in rows] == sorted(set(ids) - {""})
    for row in rows:
        p = probs[ids == row["slide_id"]]
        n, c = p.size, int(np.sum(p >= Q))
        assert (row["cells"], row["called"], row["confident"]) == (n, int(np.sum(p >= 0.5)), c)
        assert row["observed_fraction"] == c / n
        assert row["estimate"] == metrics.rogan_gladen(c / n, SENS, FPR)
        low, high = metrics.rogan_gladen_interval(c, n, SENS, FPR)
        assert (row["estimate_low"], row["estimate_high"]) == (low, high)
        assert row["estimate_low"] <= row["estimate"] <= row["estimate_high"]
        expected = {"fraction": c / n > 0.06, "count": c >= 4}.get(kind)
        if kind == "binomial":
            p_value = scipy.stats.binomtest(c, n, FPR, alternative="greater").pvalue
            assert row["p_value"] == pytest.approx(p_value, rel=1e-9, abs=1e-300)
            expected = p_value < 0.05
        else:
            assert row["p_value"] is None
        assert row["verdict"] == ("infected" if expected else "not infected")


def test_only_unknown_slides_give_no_rows():
    assert metrics.slide_verdicts([0.2, 0.9], ["", ""], RULES["count"]) == []


@pytest.mark.parametrize(
    "probs, ids",
    [
        ([], []),
        ([0.2, 0.3], ["a"]),
        ([0.2, 1.3], ["a", "a"]),
        ([0.2, -0.1], ["a", "a"]),
        ([0.2, np.nan], ["a", "a"]),
        ([[0.2, 0.3]], [["a", "a"]]),
    ],
)
def test_slide_verdicts_bad_inputs_raise(probs, ids):
    with pytest.raises(ValueError):
        metrics.slide_verdicts(probs, ids, RULES["count"])


# Exact rates and synthetic slides.


def test_false_alarm_rate_is_the_binomial_tail():
    count = RULES["count"]
    for n in [20, 50, 500, 5000]:
        assert metrics.false_alarm_rate(count, n) == pytest.approx(
            scipy.stats.binom.sf(3, n, FPR), rel=1e-12
        )
        pmf = scipy.stats.binom.pmf(np.arange(n + 1), n, FPR)
        fraction = RULES["fraction"]
        assert metrics.false_alarm_rate(fraction, n) == pytest.approx(
            pmf[np.arange(n + 1) / n > 0.06].sum(), rel=1e-9, abs=1e-15
        )
        # The binomial test keeps its significance at every size; a fixed count does not.
        assert metrics.false_alarm_rate(RULES["binomial"], n) <= 0.05
    assert metrics.false_alarm_rate(count, 5000) > 0.99
    assert metrics.false_alarm_rate(count, 19) == 0.0  # insufficient, never infected
    assert metrics.false_alarm_rate(count, 50, false_positive_rate=0.0) == 0.0
    assert metrics.detection_probability(count, 50, 1.0, sensitivity=1.0) == 1.0


def test_detection_probability_rises_with_fraction():
    for rule in RULES.values():
        curve = [metrics.detection_probability(rule, 70, f) for f in np.linspace(0, 0.3, 13)]
        assert np.all(np.diff(curve) >= -1e-12) and curve[-1] > 0.99
        assert curve[0] == metrics.false_alarm_rate(rule, 70)


@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("n_cells", [40, 150])
@pytest.mark.parametrize("fraction", [0.0, 0.04])
def test_synthetic_slides_match_the_predicted_rates(kind, n_cells, fraction):
    rule, n_slides = RULES[kind], 2000
    rng = np.random.default_rng([n_cells, int(fraction * 100), len(kind)])
    probs, ids, _ = _slides(rng, n_slides, n_cells, fraction)
    rows = metrics.slide_verdicts(probs, ids, rule)
    observed = np.mean([r["verdict"] == "infected" for r in rows])
    predicted = metrics.detection_probability(rule, n_cells, fraction)
    if fraction == 0.0:
        assert predicted == metrics.false_alarm_rate(rule, n_cells)
    standard_error = np.sqrt(predicted * (1 - predicted) / n_slides)
    assert abs(observed - predicted) <= 4 * standard_error + 1e-3, (observed, predicted)


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.false_alarm_rate(RULES["count"], -1),
        lambda: metrics.false_alarm_rate(RULES["count"], 5.0),
        lambda: metrics.false_alarm_rate(RULES["count"], 50, false_positive_rate=1.5),
        lambda: metrics.detection_probability(RULES["count"], 50, 1.2),
    ],
)
def test_bad_rate_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


# Fitting on validation slides.


def _validation(seed=1):
    """12 infected slides (3-30% parasitized) and 8 uninfected ones, 60 crops each; and a slide
    of 5 crops, below min_cells, and crops of no known slide."""
    rng = np.random.default_rng(seed)
    fractions = np.r_[np.linspace(0.03, 0.3, 12), np.zeros(8)]
    labels = np.concatenate([(rng.random(60) < f).astype(np.int64) for f in fractions])
    labels[: 12 * 60 : 60] = 1  # every infected slide has a parasitized crop
    ids = np.repeat([f"v{i:02d}" for i in range(20)], 60)
    labels = np.r_[labels, [1] * 5, [0, 1]]
    ids = np.concatenate([ids, ["small"] * 5, ["", ""]])
    return _crops(rng, labels), labels, ids


def test_false_positive_rate_and_sensitivity_of_crops():
    probs, labels, ids = _validation()
    infected = np.isin(ids, ids[labels == 1])
    got = metrics.false_positive_rate(probs, labels, infected, Q)
    healthy = probs[~infected] >= Q
    assert got["false_positive_rate"] == healthy.mean() and got["crops"] == healthy.size
    low, high = metrics.wilson_interval(int(healthy.sum()), healthy.size)
    assert (got["low"], got["high"], got["q"]) == (low, high, Q)
    sens = metrics.crop_sensitivity(probs, labels, Q)
    assert sens["sensitivity"] == np.mean(probs[labels == 1] >= Q)
    with pytest.raises(ValueError, match="uninfected"):
        metrics.false_positive_rate(probs, labels, np.zeros(labels.shape, bool), Q)
    with pytest.raises(ValueError):
        metrics.false_positive_rate(probs, labels, infected[:-1], Q)
    with pytest.raises(ValueError):
        metrics.crop_sensitivity(probs, np.zeros_like(labels), Q)


def test_choose_count_rule_takes_the_smallest_k_without_false_alarms():
    probs, labels, ids = _validation()
    rule = metrics.choose_count_rule(probs, labels, ids, min_cells=20, q=Q)
    healthy = [np.sum(probs[ids == f"v{i:02d}"] >= Q) for i in range(12, 20)]
    assert rule.k == max(healthy) + 1 and rule.kind == "count" and rule.min_cells == 20
    some = metrics.choose_count_rule(probs, labels, ids, 20, Q, max_false_alarm_rate=0.25)
    # By brute force: the smallest k at which at most 2 of the 8 healthy slides reach k.
    assert some.k == min(k for k in range(1, 100) if sum(h >= k for h in healthy) <= 2) < rule.k
    used = np.char.startswith(ids, "v")
    assert rule.false_positive_rate == np.mean(probs[used & ~np.isin(ids, ids[labels == 1])] >= Q)
    assert rule.sensitivity == np.mean(probs[used & (labels == 1)] >= Q)


def test_choose_fraction_rule_reuses_choose_fraction_threshold():
    probs, labels, ids = _validation()
    rule = metrics.choose_fraction_rule(probs, labels, ids, min_cells=20, q=Q)
    used = np.char.startswith(ids, "v")
    expected = metrics.choose_fraction_threshold(labels[used], probs[used], ids[used], Q)
    assert rule.kind == "fraction" and rule.threshold == expected and rule.q == Q


def test_choose_binomial_rule_measures_the_false_positive_rate():
    probs, labels, ids = _validation()
    rule = metrics.choose_binomial_rule(probs, labels, ids, min_cells=20, q=Q, alpha=0.01)
    used = np.char.startswith(ids, "v")
    fpr = metrics.false_positive_rate(
        probs[used], labels[used], np.isin(ids[used], ids[labels == 1]), Q
    )
    assert rule.alpha == 0.01 and rule.false_positive_rate == fpr["false_positive_rate"]
    upper = metrics.choose_binomial_rule(probs, labels, ids, 20, Q, 0.01, use_upper_bound=True)
    assert upper.false_positive_rate == fpr["high"]


def test_choosers_refuse_unusable_validation():
    probs, labels, ids = _validation()
    infected_only = np.isin(ids, ids[labels == 1])
    with pytest.raises(ValueError, match="uninfected"):
        metrics.choose_count_rule(
            probs[infected_only], labels[infected_only], ids[infected_only], 20, Q
        )
    with pytest.raises(ValueError, match="min_cells|crops"):
        metrics.choose_binomial_rule(probs, labels, ids, 1000, Q, 0.01)
    with pytest.raises(ValueError):
        metrics.choose_count_rule(probs, labels, ids, 20, Q, max_false_alarm_rate=1.0)


def test_patient_bootstrap_keeps_both_classes_and_repeats_exactly():
    from mnres.metrics.intervals import patient_bootstrap

    infected = np.array([True] * 5 + [False] * 2)
    seen = []

    def statistic(pick):
        seen.append(pick)
        return {"infected share": infected[pick].mean()}

    first = patient_bootstrap(statistic, infected, resamples=200, seed=3)
    # Drawn within each class: every resample has 5 infected and 2 uninfected patients.
    assert all(len(p) == 7 and infected[p].sum() == 5 for p in seen)
    assert first == {"infected share": (5 / 7, 5 / 7)}
    again = patient_bootstrap(lambda p: {"first": float(p[0])}, infected, resamples=200, seed=3)
    assert again == patient_bootstrap(lambda p: {"first": float(p[0])}, infected, resamples=200,
                                      seed=3)  # fmt: skip
    assert again["first"][0] < again["first"][1]  # patients 0-4 drawn, not always the same
