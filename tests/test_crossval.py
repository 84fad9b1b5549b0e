"""Patient-level cross-validation: fold assignment, aggregation, resume, and the slide plot."""

import json
import os

import numpy as np
import pytest
from data_fixtures import tiny_crossval_config
from PIL import Image

from experiments.configs import smoke
from mnres import run_folder
from mnres.data import folds as folds_lib
from mnres.data import synthetic
from mnres.reporting import plots
from mnres.training import crossval
from mnres.training import loop as train


def _cells(n=3000, num_slides=40, seed=0):
    _, labels, slides = synthetic.draw_cells(n, 32, num_slides, seed)
    return labels, slides


@pytest.mark.parametrize("num_folds", [2, 5])
def test_slide_folds_are_disjoint_stratified_and_cover_everything(num_folds):
    labels, slides = _cells()
    folds = folds_lib.assign_folds(labels, slides, num_folds, seed=0)
    assert folds.min() == 0 and folds.max() == num_folds - 1  # every cell in one fold
    for slide in np.unique(slides):
        assert len(np.unique(folds[slides == slide])) == 1, slide  # no patient in two folds
    infected = {s: labels[slides == s].any() for s in np.unique(slides)}
    for k in range(num_folds):
        fold_slides = np.unique(slides[folds == k])
        n_infected = sum(infected[s] for s in fold_slides)
        # Stratified: infected and uninfected patients in every fold, in about equal numbers.
        assert 0 < n_infected < len(fold_slides)
        share = np.mean(folds == k)
        assert abs(share - 1 / num_folds) < 0.5 / num_folds
    np.testing.assert_array_equal(folds, folds_lib.assign_folds(labels, slides, num_folds, 0))


def test_image_folds_and_errors():
    labels, slides = _cells(600, 10)
    folds = folds_lib.assign_folds(labels, slides, 3, seed=0, split_by="image")
    for k in range(3):
        assert abs(np.mean(labels[folds == k]) - np.mean(labels)) < 0.01  # stratified by class
    with pytest.raises(ValueError, match="slide id"):
        folds_lib.assign_folds(labels, np.full(len(labels), ""), 3, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        folds_lib.assign_folds(labels, slides, 1, seed=0)
    with pytest.raises(ValueError, match="empty"):
        folds_lib.assign_folds(labels[:40], slides[:40], 30, seed=0)


def test_fold_dataset_keeps_patients_apart():
    config = smoke.get_config()
    pool, manifest = folds_lib.load_pool(config.data, config.seed)
    folds = folds_lib.assign_folds(pool.labels, pool.slide_ids, 3, config.seed)
    spec = folds_lib.fold_spec(config, 3, "slide")
    assert spec["validation_fraction"] == pytest.approx(0.1 / 0.9)
    seen_test = []
    for k in range(3):
        ds = folds_lib.fold_dataset(pool, folds, k, spec, manifest)
        parts = [set(ds.train.slide_ids), set(ds.validation.slide_ids), set(ds.test.slide_ids)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(ds.train) + len(ds.validation) + len(ds.test) == len(pool)
        assert ds.manifest["slides_in_several_splits"] == []
        assert ds.manifest["crossval"]["fold"] == k
        seen_test += list(ds.test.names)
    assert sorted(seen_test) == sorted(pool.names)  # every cell tested exactly once


def test_a_fold_seed_keeps_the_folds_while_the_training_seed_changes(tmp_path, monkeypatch):
    """--fold_seed: other weights on the same slides (the members of a per-fold ensemble)."""

    class Started(Exception):
        pass

    seen = {}

    def start(config, workdir, ds, spec, fold):  # stands in for training
        seen[workdir] = (
            spec["seed"],
            config.seed,
            sorted(ds.validation.names),
            sorted(ds.test.names),
        )
        raise Started

    monkeypatch.setattr(crossval, "run_fold", start)
    for seed, fold_seed in ((0, None), (1, 0), (1, None)):
        config = smoke.get_config()
        config.seed = seed
        with pytest.raises(Started):
            workdir = str(tmp_path / f"{seed}_{fold_seed}")
            crossval.run_crossval(config, workdir, num_folds=3, folds=[0],
                                  compare_image_level=False, fold_seed=fold_seed)  # fmt: skip
    base, kept, other = (
        seen[str(tmp_path / f"{name}" / "fold_0")] for name in ("0_None", "1_0", "1_None")
    )
    assert kept[:2] == (0, 1) and kept[2:] == base[2:]  # seed 1 trains on seed 0's folds
    assert other[0] == 1 and other[3] != base[3]  # without it, seed 1 cuts other folds


def test_summarize_and_aggregate():
    s = crossval.summarize([0.9, 0.8, None, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["n"] == 3
    assert s["std"] == pytest.approx(np.std([0.9, 0.8, 1.0], ddof=1))
    assert crossval.summarize([0.5])["std"] == 0.0
    assert crossval.summarize([None])["mean"] is None
    folds = [
        {
            "test": {k: 0.5 + 0.1 * i for k in crossval.CELL_METRICS},
            "test_patient": {k: 1.0 - 0.1 * i for k in crossval.PATIENT_METRICS},
            "calibration": {"temperature": 1.0 + i, "ece_before": 0.1, "ece_after": 0.05},
            "wall_time_s": 10.0,
            "fold": i,
        }
        for i in range(3)
    ]
    agg = crossval.aggregate(folds)
    assert agg["cell"]["auc"]["mean"] == pytest.approx(0.6)
    assert agg["cell"]["auc"]["std"] == pytest.approx(0.1)
    assert agg["patient"]["sensitivity"]["mean"] == pytest.approx(0.9)
    assert agg["calibration"]["temperature"]["values"] == [1.0, 2.0, 3.0]
    assert agg["wall_time_s"] == 30.0
    text = crossval.markdown(
        {"num_folds": 5, "patient_level": {"folds": folds, "aggregate": agg, "complete": False}}
    )
    assert "Incomplete" in text and "0.6000 ± 0.1000" in text
    assert "by patient" in text and "by image" not in text
    image_only = crossval.markdown(
        {"num_folds": 3, "image_level": {"folds": folds, "aggregate": agg, "complete": True}}
    )
    assert "Incomplete" not in image_only and "mean ± std (by image)" in image_only
    assert "Warning" not in image_only
    folds[1]["warnings"] = ["Validation never beat the class prior."]
    warned = crossval.markdown(
        {"num_folds": 3, "image_level": {"folds": folds, "aggregate": agg, "complete": True}}
    )
    assert "**Warning, fold 1:** Validation never beat the class prior." in warned
    with pytest.raises(ValueError, match="nothing to run"):
        crossval.run_crossval(None, "unused", patient_level=False, compare_image_level=False)
    assert not os.path.exists("unused")
    with pytest.raises(ValueError, match="not in 0..4"):
        crossval.run_crossval(None, "unused", folds=[5])


def test_plot_slide_fractions(tmp_path):
    rng = np.random.default_rng(0)
    slides = [
        {"slide_id": f"S{i}", "n_cells": int(rng.integers(5, 100)), "true_fraction": t,
         "predicted_fraction": float(np.clip(t + rng.normal(0, 0.05), 0, 1)),
         "infected": t > 0, "predicted_infected": (t > 0) != (i == 3)}
        for i, t in enumerate(np.r_[np.zeros(5), rng.uniform(0.3, 0.9, 10)])
    ]  # fmt: skip
    path = tmp_path / "slides.png"
    plots.plot_slide_fractions(slides, str(path))
    with Image.open(path) as image:
        assert image.size[0] > 300
    plots.plot_slide_fractions([{k: v for k, v in s.items() if k != "predicted_infected"}
                                 for s in slides], str(path))  # fmt: skip


@pytest.mark.slow
def test_crossval_resumes_after_an_interrupted_fold(tmp_path, monkeypatch):
    """Fold 0 alone (an interrupted run), then the rest: fold 0 is not trained again (~60 s)."""
    config, workdir = tiny_crossval_config(), str(tmp_path / "cv")
    trained = []
    real = train.train_and_evaluate

    def counting(config, workdir, **kwargs):
        trained.append(os.path.relpath(workdir, str(tmp_path)))
        return real(config, workdir, **kwargs)

    monkeypatch.setattr(train, "train_and_evaluate", counting)
    first = crossval.run_crossval(config, workdir, num_folds=2, folds=[0])
    assert trained == ["cv/fold_0", "cv/image_level/fold_0"]
    assert not first["patient_level"]["complete"]
    assert "Incomplete" in open(os.path.join(workdir, crossval.CROSSVAL_MD)).read()

    result = crossval.run_crossval(config, workdir, num_folds=2)
    assert trained[2:] == ["cv/fold_1", "cv/image_level/fold_1"]  # fold 0 skipped
    for section in ("patient_level", "image_level"):
        assert result[section]["complete"]
        agg = result[section]["aggregate"]
        for key in crossval.CELL_METRICS:
            values = [f["test"][key] for f in result[section]["folds"]]
            assert agg["cell"][key]["mean"] == pytest.approx(np.mean(values))
            assert agg["cell"][key]["std"] == pytest.approx(np.std(values, ddof=1))
    assert result["patient_level"]["aggregate"]["patient"]["sensitivity"]["n"] == 2
    pooled = result["patient_level"]["pooled"]
    assert pooled["patient"]["n_patients"] == 24  # every patient tested once
    assert pooled["cell"]["n"] == 480
    for name in (
        "crossval.json",
        "crossval.md",
        "slide_fractions.png",
        "reliability_uncalibrated.png",
        "reliability_calibrated.png",
        "fold_0/calibration.json",
        "fold_1/report.json",
        "image_level/fold_1/fold.json",
    ):
        assert os.path.isfile(os.path.join(workdir, name)), name  # fmt: skip
    record = json.load(open(os.path.join(workdir, "fold_1", "calibration.json")))
    assert {"temperature", "threshold_at_spec_95", "threshold_at_spec_98"} <= set(record)

    # The fold's splits are rebuilt from the run folder (for Grad-CAM and export).
    rebuilt = folds_lib.dataset_for_run(os.path.join(workdir, "fold_1"), config)
    manifest = json.load(open(os.path.join(workdir, "fold_1", "manifest.json")))
    assert rebuilt.manifest["splits"] == manifest["splits"]

    # A third call with everything done trains nothing.
    crossval.run_crossval(config, workdir, num_folds=2)
    assert len(trained) == 4

    # A fold killed before its fold.json: the next call evaluates its last checkpoint again,
    # and the fold's wall time counts the epochs the killed command trained.
    fold_1 = os.path.join(workdir, "fold_1")
    os.remove(os.path.join(fold_1, crossval.FOLD_JSON))
    crossval.run_crossval(config, workdir, num_folds=2)
    assert trained[4:] == ["cv/fold_1"]
    epochs = run_folder.epochs_seconds(run_folder.read_history(fold_1))
    training = run_folder.read_report(fold_1)["training"]
    assert training["earlier_epochs_seconds"] == epochs > 0
    wall = json.load(open(os.path.join(fold_1, crossval.FOLD_JSON)))["wall_time_s"]
    assert (
        wall >= run_folder.whole_run_seconds(training) == training["wall_seconds_this_run"] + epochs
    )
    with pytest.raises(ValueError, match="new workdir"):
        crossval.run_crossval(config, workdir, num_folds=3, compare_image_level=False)
