"""experiments.results_tables: docs/results.md's tables from the committed records, the same text
every time, with the page's one convention for spread (SD over folds, Wilson for patients, a
bootstrap over patients for the cells of one evaluation)."""

import json

import numpy as np
import pytest

from experiments import docs_tables, results_tables


def _slide(tp, tn, parasitized, uninfected, slide_id="S"):
    """A slide as report.json's test_patient.slides lists it."""
    n = parasitized + uninfected
    called = tp + (uninfected - tn)
    return {"slide_id": slide_id, "n_cells": n, "n_parasitized_true": parasitized,
            "n_parasitized_predicted": called, "accuracy": (tp + tn) / n,
            "infected": parasitized > 0}  # fmt: skip


def _counts(slides):
    """(slides, 4): true positives, true negatives, parasitized and uninfected crops."""
    from experiments import model_card_figures

    c = model_card_figures.slide_counts({"slides": slides})
    return np.stack([c["tp"], c["correct"] - c["tp"], c["pos"], c["n"] - c["pos"]], axis=1)


def test_slide_counts_recover_each_slides_confusion():
    slides = [_slide(40, 50, 45, 55, "A"), _slide(0, 70, 0, 75, "B"), _slide(9, 1, 10, 1, "C")]
    assert _counts(slides).tolist() == [[40, 50, 45, 55], [0, 70, 0, 75], [9, 1, 10, 1]]


def test_the_bootstrap_resamples_patients_and_repeats_exactly():
    rng = np.random.default_rng(1)
    slides = [_slide(int(rng.integers(30, 50)), int(rng.integers(40, 60)), 50, 60, f"S{i}")
              for i in range(16)]  # fmt: skip
    first, again = results_tables.bootstrap_cells(slides), results_tables.bootstrap_cells(slides)
    assert first == again  # a fixed seed: the generated table does not move between runs
    counts = _counts(slides).sum(axis=0)
    tp, tn, parasitized, uninfected = counts
    pooled = {"accuracy": (tp + tn) / (parasitized + uninfected),
              "sensitivity": tp / parasitized, "specificity": tn / uninfected}  # fmt: skip
    assert first["auc"] is None  # counts only: no AUC
    for key in pooled:
        low, high = first[key]
        assert low < pooled[key] < high
    # Whole patients move together: one slide's crops counted as independent draws would give a
    # far narrower interval than resampling the 16 slides.
    low, high = first["accuracy"]
    n = parasitized + uninfected
    binomial = 2 * 1.96 * np.sqrt(pooled["accuracy"] * (1 - pooled["accuracy"]) / n)
    assert high - low > binomial


@pytest.mark.parametrize("name", sorted(results_tables.GENERATORS))
def test_each_table_is_the_same_text_every_time(name):
    generate = results_tables.GENERATORS[name]
    assert generate() == generate()
    assert name in docs_tables.GENERATORS  # docs_tables merges them in


def test_the_search_tables_give_the_sd_not_the_standard_error():
    test = results_tables.search_test()
    assert "| cell accuracy % | 96.43 +/- 0.80 |" in test  # SD over the 5 test folds (SE 0.36)
    assert "| patients right | 146 of 160 (86-95%) |" in test
    validation = results_tables.search_validation()
    assert "mean +/- SD over folds" in validation
    for text in (test, validation, results_tables.search_paired()):
        assert "standard error" not in text and "+/- SE" not in text
    targets = results_tables.search_targets()
    assert "| cell accuracy | 96.43% +/- 0.80 | >= 96.50% | missed by 0.07 points |" in targets


def test_the_shipped_split_shows_what_the_slide_prior_did():
    report = json.loads((results_tables.RESULTS / "malaria_model" / "report.json").read_text())
    table = results_tables.shipped_split()
    for key, marker in (("without", "without the slide prior"), ("with", "(shipped)")):
        row = next(r for r in table.splitlines() if marker in r)
        validation = report["slide_prior"][key]["validation"]
        assert f"{100 * validation['accuracy']:.2f}%" in row and f"{validation['auc']:.4f}" in row


def test_each_fold_takes_the_teacher_ensemble_that_taught_its_student():
    first, rerun = docs_tables._TEACHERS
    found = {
        first: {0: {"recipe": first, "fold": 0}},
        # a fold 0 of the second ensemble (were one recorded) is not fold 0's teacher
        rerun: {k: {"recipe": rerun, "fold": k} for k in (0, 1, 3)},
    }
    teacher = docs_tables.teacher_ensemble(found)
    assert {k: s["recipe"] for k, s in teacher.items()} == {0: first, 1: rerun, 3: rerun}
