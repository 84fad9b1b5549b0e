"""Every metric against scikit-learn (or a hand computation) on random data and edge cases."""

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from mnres import metrics

SEEDS = range(40)


def _random_case(seed):
    """Random labels and probabilities, with ties and varied class balance and size."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    labels = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(np.int32)
    probs = np.clip(0.5 * labels + rng.normal(0.25, 0.3, n), 0.0, 1.0)
    if seed % 3 == 0:  # Coarse scores: many ties, including at the threshold.
        probs = np.round(probs * 4) / 4
    return labels, probs


def _sklearn_metrics(labels, probs, threshold):
    predicted = (probs >= threshold).astype(np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = skm.confusion_matrix(labels, predicted, labels=[0, 1])
        specificity = skm.recall_score(labels, predicted, pos_label=0, zero_division=0)
        recall = skm.recall_score(labels, predicted, zero_division=0)
        expected = {
            "accuracy": skm.accuracy_score(labels, predicted),
            "precision": skm.precision_score(labels, predicted, zero_division=0),
            "recall": recall,
            "sensitivity": recall,
            "specificity": specificity,
            "balanced_accuracy": (recall + specificity) / 2,
            "f1": skm.f1_score(labels, predicted, zero_division=0),
            "mcc": skm.matthews_corrcoef(labels, predicted),
            "auc": skm.roc_auc_score(labels, probs) if len(set(labels.tolist())) == 2 else None,
        }
    return expected, cm.tolist()


def _assert_matches_sklearn(labels, probs, threshold=0.5):
    got = metrics.binary_metrics(labels, probs, threshold)
    expected, cm = _sklearn_metrics(labels, probs, threshold)
    for key, value in expected.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["confusion_matrix"] == cm
    assert got["n"] == len(labels)
    assert got["n_parasitized"] == int(labels.sum())
    assert got["threshold"] == threshold
    json.dumps(got, allow_nan=False)  # Plain Python types, no NaN.
    for key, value in got.items():
        assert type(value) in (int, float, list, type(None)), (key, type(value))


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_metrics_match_sklearn(seed):
    labels, probs = _random_case(seed)
    threshold = [0.5, 0.25, 0.75, 0.0, 1.0][seed % 5]
    _assert_matches_sklearn(labels, probs, threshold)


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_curve_matches_sklearn(seed):
    labels, probs = _random_case(seed)
    if len(set(labels.tolist())) < 2:
        labels[0] = 1 - labels[0]
    fpr, tpr, thresholds = metrics.roc_curve(labels, probs)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds, sk_thresholds)
    # Each point is the operating point of `probs >= threshold`.
    for i in range(1, len(thresholds)):
        m = metrics.binary_metrics(labels, probs, thresholds[i])
        assert m["recall"] == pytest.approx(tpr[i])
        assert 1 - m["specificity"] == pytest.approx(fpr[i])


@pytest.mark.parametrize(
    "labels, probs",
    [
        ([0, 0, 0, 0], [0.1, 0.7, 0.4, 0.9]),  # No parasitized cell.
        ([1, 1, 1], [0.1, 0.7, 0.9]),  # No uninfected cell.
        ([0, 1, 1, 0], [0.3, 0.3, 0.3, 0.3]),  # All predictions equal (all uninfected).
        ([0, 1, 1, 0], [0.8, 0.8, 0.8, 0.8]),  # All predictions equal (all parasitized).
        ([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.2]),  # All correct.
        ([0, 1, 1, 0], [0.9, 0.1, 0.4, 0.8]),  # All wrong.
        ([0, 0, 0], [0.0, 0.0, 0.0]),  # One class, all true negatives.
        ([1], [1.0]),  # A single example.
        ([0, 1], [0.5, 0.5]),  # Ties at the threshold are called parasitized.
    ],
)
def test_edge_cases_match_sklearn(labels, probs):
    _assert_matches_sklearn(np.array(labels), np.array(probs))


def test_edge_case_values():
    m = metrics.binary_metrics([0, 0, 0], [0.9, 0.9, 0.1])
    assert m["auc"] is None  # One class absent.
    assert m["recall"] == 0.0 and m["precision"] == 0.0 and m["f1"] == 0.0 and m["mcc"] == 0.0
    assert m["specificity"] == pytest.approx(1 / 3)
    m = metrics.binary_metrics([0, 1, 1, 0], [0.2, 0.2, 0.2, 0.2])
    assert m["auc"] == 0.5 and m["precision"] == 0.0 and m["specificity"] == 1.0
    m = metrics.binary_metrics([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.2])
    assert m["accuracy"] == m["f1"] == m["mcc"] == m["auc"] == 1.0
    assert m["confusion_matrix"] == [[2, 0], [0, 2]]


def test_auc_is_exact_for_large_inputs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200_000)
    probs = rng.random(200_000)
    got = metrics.binary_metrics(labels, probs)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-12)
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, probs >= 0.5), abs=1e-12)


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([], [], "empty"),
        ([0, 1], [0.5], "length"),
        ([0, 1, 1], [0.5, 0.2], "length"),
        ([0, 1], [0.5, 1.2], r"\[0, 1\]"),
        ([0, 1], [-0.1, 0.5], r"\[0, 1\]"),
        ([0, 1], [np.nan, 0.5], r"\[0, 1\]"),
        ([0, 2], [0.1, 0.5], "0 or 1"),
        ([0, 1], [[0.9, 0.1], [0.2, 0.8]], "1-D"),
    ],
)
def test_invalid_inputs_raise(labels, probs, match):
    for fn in (metrics.binary_metrics, metrics.roc_curve, metrics.expected_calibration_error):
        with pytest.raises(ValueError, match=match):
            fn(labels, probs)
    with pytest.raises(ValueError, match=match):
        metrics.slide_table(labels, probs, ["a"] * len(labels))


def test_roc_curve_one_class_absent_is_nan():
    fpr, tpr, thresholds = metrics.roc_curve([1, 1, 1], [0.2, 0.5, 0.5])
    assert np.all(np.isnan(fpr))
    np.testing.assert_allclose(tpr, [0.0, 2 / 3, 1.0])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.5, 0.2])


# Patient level: a hand-made example. Slides, cells (label, prob), at cell threshold 0.5:
#   A: infected, 4 cells [1 .9, 1 .8, 0 .2, 0 .6] -> 3/4 called parasitized, cell accuracy 3/4
#   B: uninfected, 5 cells [0 .1, 0 .2, 0 .7, 0 .3, 0 .4] -> 1/5 called, accuracy 4/5
#   C: infected, 2 cells [1 .4, 1 .55] -> 1/2 called, accuracy 1/2
#   D: uninfected, 4 cells all 0 with probs .1 -> 0/4 called, accuracy 1
#   E: infected, 5 cells [1 .3, 0 .1, 0 .2, 0 .2, 0 .1] -> 0/5 called, accuracy 4/5
#   '' (unknown slide): 2 cells, left out.
CELLS = [
    ("A", 1, 0.9), ("A", 1, 0.8), ("A", 0, 0.2), ("A", 0, 0.6),
    ("B", 0, 0.1), ("B", 0, 0.2), ("B", 0, 0.7), ("B", 0, 0.3), ("B", 0, 0.4),
    ("C", 1, 0.4), ("C", 1, 0.55),
    ("D", 0, 0.1), ("D", 0, 0.1), ("D", 0, 0.1), ("D", 0, 0.1),
    ("E", 1, 0.3), ("E", 0, 0.1), ("E", 0, 0.2), ("E", 0, 0.2), ("E", 0, 0.1),
    ("", 1, 0.9), ("", 0, 0.9),
]  # fmt: skip


def _cells():
    slides, labels, probs = zip(*CELLS, strict=True)
    return np.array(labels), np.array(probs), np.array(slides)


def test_slide_table_by_hand():
    rows = metrics.slide_table(*_cells())
    assert [r["slide_id"] for r in rows] == ["A", "B", "C", "D", "E"]
    assert [r["n_cells"] for r in rows] == [4, 5, 2, 4, 5]
    assert [r["n_parasitized_true"] for r in rows] == [2, 0, 2, 0, 1]
    assert [r["true_fraction"] for r in rows] == [0.5, 0.0, 1.0, 0.0, 0.2]
    assert [r["predicted_fraction"] for r in rows] == [0.75, 0.2, 0.5, 0.0, 0.0]
    assert [r["accuracy"] for r in rows] == [0.75, 0.8, 0.5, 1.0, 0.8]
    assert [r["infected"] for r in rows] == [True, False, True, False, True]
    json.dumps(rows, allow_nan=False)
    labels, probs, slides = _cells()
    as_bytes = np.array([s.encode() for s in slides], dtype=object)
    assert metrics.slide_table(labels, probs, as_bytes) == rows


def test_choose_fraction_threshold_by_hand():
    # Fractions: infected A .75, C .5, E 0; uninfected B .2, D 0. E can never be called infected
    # (t >= 0), D never infected either. Intervals of t: [0, .2) calls A, B, C -> sens 2/3,
    # spec 1/2; [.2, .5) calls A, C -> sens 2/3, spec 1 (best); [.5, .75) calls A -> 1/3, 1.
    # Best run [.2, .5) -> midpoint .35.
    labels, probs, slides = _cells()
    assert metrics.choose_fraction_threshold(labels, probs, slides) == pytest.approx(0.35)


def test_choose_fraction_threshold_ties_take_widest_then_lowest():
    # Two slides: uninfected at .2, infected at .6 -> perfect on [.2, .6): midpoint .4.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.1, 0.1])
    slides = np.array(["u"] * 5 + ["i"] * 5)
    assert metrics.choose_fraction_threshold(labels, probs, slides) == pytest.approx(0.4)
    # Only infected patients: every t < the smallest fraction .2 is perfect -> [0, .2) -> .1.
    slides = np.array(["a"] * 5 + ["b"] * 5)
    labels = np.ones(10, dtype=int)
    assert metrics.choose_fraction_threshold(labels, probs, slides) == pytest.approx(0.1)
    # Fractions a .125 infected, b .25 uninfected, c .625 infected, d 1 uninfected: the best
    # balanced accuracy .5 is reached on [0, .125) and [.25, .625) -> the widest -> .4375.
    assert (
        metrics.choose_fraction_threshold(
            *_slides({"a": (1, 1), "b": (0, 2), "c": (1, 5), "d": (0, 8)}, 8)
        )
        == 0.4375
    )
    # Fractions a .25 infected, b .5 uninfected, c .75 infected, d 1 uninfected: the best .5 is
    # reached on [0, .25) and [.5, .75), equally wide -> the lowest -> .125.
    assert (
        metrics.choose_fraction_threshold(
            *_slides({"a": (1, 1), "b": (0, 2), "c": (1, 3), "d": (0, 4)}, 4)
        )
        == 0.125
    )


def _slides(spec, n_cells):
    """Cells of {slide: (infected, n_called)}: n_called at prob .9, one parasitized if infected."""
    labels, probs, slides = [], [], []
    for slide, (infected, n_called) in spec.items():
        labels += [infected] + [0] * (n_cells - 1)
        probs += [0.9] * n_called + [0.1] * (n_cells - n_called)
        slides += [slide] * n_cells
    return labels, probs, slides


def test_patient_metrics_by_hand():
    labels, probs, slides = _cells()
    got = metrics.patient_metrics(labels, probs, slides, fraction_threshold=0.35)
    # Called infected: A (.75), C (.5). Truth infected: A, C, E. TP 2, FN 1 (E), TN 2, FP 0.
    assert got["n_patients"] == 5 and got["n_infected"] == 3 and got["n_uninfected"] == 2
    assert got["confusion_matrix"] == [[2, 0], [1, 2]]
    assert got["accuracy"] == pytest.approx(4 / 5)
    assert got["sensitivity"] == pytest.approx(2 / 3)
    assert got["specificity"] == 1.0
    assert got["balanced_accuracy"] == pytest.approx(5 / 6)
    assert got["errors"] == ["E"]
    assert got["per_slide_accuracy"] == {"min": 0.5, "median": 0.8, "max": 1.0}
    assert got["fraction_threshold"] == 0.35 and got["threshold"] == 0.5
    # AUC of the fraction for infection: infected {.75, .5, 0} vs uninfected {.2, 0}:
    # pairs won 2 + 2 + 0, tied 1 (E vs D) -> (4 + 0.5) / 6.
    assert got["auc"] == pytest.approx(4.5 / 6)
    assert [r["predicted_infected"] for r in got["slides"]] == [True, False, True, False, False]
    json.dumps(got, allow_nan=False)


def test_patient_metrics_need_slide_ids():
    with pytest.raises(ValueError, match="slide ids"):
        metrics.patient_metrics([0, 1], [0.2, 0.8], ["", ""], 0.5)
    with pytest.raises(ValueError, match="slide_ids shape"):
        metrics.patient_metrics([0, 1], [0.2, 0.8], ["a"], 0.5)


def _reference_ece(labels, probs, n_bins):
    """Guo et al.'s loop: confidence in (lower, upper]."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    confidence = np.maximum(probs, 1 - probs)
    accuracy = ((probs >= 0.5) == labels).astype(float)
    ece = 0.0
    edges = np.linspace(0, 1, n_bins + 1)
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs(accuracy[in_bin].mean() - confidence[in_bin].mean())
    return ece


@pytest.mark.parametrize("seed", range(10))
def test_expected_calibration_error_matches_reference(seed):
    labels, probs = _random_case(seed)
    for n_bins in (1, 10, 15):
        got = metrics.expected_calibration_error(labels, probs, n_bins)
        assert got == pytest.approx(_reference_ece(labels, probs, n_bins), abs=1e-12)


def test_expected_calibration_error_values():
    # Always 90% confident and always wrong: ECE = 0.9.
    assert metrics.expected_calibration_error([0, 1], [0.9, 0.1]) == pytest.approx(0.9)
    # Calibrated by construction: labels drawn with P(parasitized) = probs.
    rng = np.random.default_rng(0)
    probs = rng.random(200_000)
    labels = (rng.random(200_000) < probs).astype(int)
    assert metrics.expected_calibration_error(labels, probs) < 0.01
    bins = metrics.calibration_bins(labels, probs, n_bins=10)
    assert sum(bins["count"]) == 200_000 and bins["count"][:5] == [0] * 5
    assert bins["accuracy"][0] is None


@pytest.mark.parametrize("seed", range(10))
def test_sensitivity_at_specificity_is_the_best_admissible_point(seed):
    labels, probs = _random_case(seed)
    if len(set(labels.tolist())) < 2:
        labels[0] = 1 - labels[0]
    candidates = [metrics.binary_metrics(labels, probs, t) for t in np.r_[np.unique(probs), 1.1]]
    for target in (0.0, 0.5, 0.9, 0.95, 1.0):
        got = metrics.sensitivity_at_specificity(labels, probs, target)
        m = metrics.binary_metrics(labels, probs, got["threshold"])
        assert m["specificity"] >= target - 1e-12
        assert m["sensitivity"] == pytest.approx(got["sensitivity"])
        assert m["specificity"] == pytest.approx(got["specificity"])
        # Brute force over every candidate threshold.
        best = max(m["sensitivity"] for m in candidates if m["specificity"] >= target - 1e-12)
        assert got["sensitivity"] == pytest.approx(best)


def test_sensitivity_at_specificity_edge_cases():
    got = metrics.sensitivity_at_specificity([0, 1, 0], [1.0, 0.2, 0.9], 1.0)
    assert got["threshold"] > 1.0 and got["sensitivity"] == 0.0 and got["specificity"] == 1.0
    got = metrics.sensitivity_at_specificity([1, 1], [0.3, 0.4], 0.9)
    assert got == {
        "threshold": None,
        "sensitivity": None,
        "specificity": None,
        "target_specificity": 0.9,
    }
    with pytest.raises(ValueError, match="specificity"):
        metrics.sensitivity_at_specificity([0, 1], [0.3, 0.4], 1.5)
