"""Per-fold ensembles of recorded recipes: combined outputs, their figures, their record."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import tiny_crossval_config

from experiments import ablation, fold_outputs, verdict_cv
from experiments.configs import default
from experiments.search import ensemble_folds, fold_summary
from experiments.search import records as search
from mnres import metrics, run_folder
from mnres.data import folds as folds_lib
from mnres.metrics import slide_prior
from mnres.training import crossval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outputs(log_odds, labels, names=None):
    out = {"log_odds": np.asarray(log_odds, np.float32), "labels": np.asarray(labels)}
    if names is not None:
        out["names"] = np.asarray(names)
    return out


def test_members_log_odds_are_averaged():
    a = _outputs([2.0, -1.0, 0.5], [1, 0, 1], ["x", "y", "z"])
    b = _outputs([0.0, -3.0, -1.5], [1, 0, 1], ["x", "y", "z"])
    combined = ensemble_folds.mean_log_odds([a, b], "test")
    np.testing.assert_allclose(combined["log_odds"], [1.0, -2.0, -0.5])
    np.testing.assert_allclose(combined["probs"], 1 / (1 + np.exp([-1.0, 2.0, 0.5])))
    # One confident member outvotes a doubtful one: the third crop is called uninfected.
    assert metrics.binary_metrics(combined["labels"], combined["probs"])["accuracy"] == 2 / 3


def test_members_of_other_crops_are_refused():
    a = _outputs([1.0, -1.0], [1, 0], ["x", "y"])
    with pytest.raises(ValueError, match="different validation crops"):
        ensemble_folds.mean_log_odds([a, _outputs([1.0, -1.0], [0, 1])], "validation")
    with pytest.raises(ValueError, match="different test crops"):
        ensemble_folds.mean_log_odds([a, _outputs([1.0, -1.0], [1, 0], ["y", "x"])], "test")


def _slides(fractions, infected, n=50, seed=0):
    """Outputs of slides whose given fraction of cells is called parasitized (log-odds +-2)."""
    rng = np.random.default_rng(seed)
    labels, log_odds, slides = [], [], []
    for i, (f, sick) in enumerate(zip(fractions, infected, strict=True)):
        called = rng.permutation(np.arange(n) < round(f * n))
        labels += [int(sick and c) for c in called]
        log_odds += list(np.where(called, 2.0, -2.0))
        slides += [f"S{i}"] * n
    return _outputs(log_odds, labels), np.array(slides)


def test_the_test_patients_use_the_threshold_chosen_on_validation():
    val, val_slides = _slides([0.5, 0.3, 0.0, 0.02], [True, True, False, False])
    test, test_slides = _slides([0.4, 0.04, 0.0, 0.06], [True, True, False, False], seed=1)
    combined = [ensemble_folds.mean_log_odds([x], "x") for x in (val, test)]
    validation, tested = ensemble_folds.score(combined[0], val_slides, combined[1], test_slides)
    threshold = validation["patients"]["fraction_threshold"]
    assert 0.02 <= threshold < 0.3
    expected = metrics.patient_metrics(combined[1]["labels"], combined[1]["probs"], test_slides,
                                       threshold)  # fmt: skip
    assert tested["patients"]["errors"] == expected["errors"]
    assert tested["patients"]["fraction_threshold"] == threshold
    assert threshold == metrics.choose_fraction_threshold(
        combined[0]["labels"], combined[0]["probs"], val_slides
    )
    # The uninfected slides' called cells are the only cell errors: 1 on validation, 3 on test.
    assert validation["cell"]["accuracy"] == 199 / 200 and validation["cell"]["n"] == 200
    assert tested["cell"]["accuracy"] == 197 / 200 and tested["calibration"]["temperature"] > 0


@pytest.mark.parametrize(
    "members, error",
    [
        (["gray_world"], "expected RECIPE=WORKDIR"),
        (["a=runs/a", "a=runs/b"], "--member a is given twice"),
        (["a=runs/a"], "at least two --member (one with --slide_prior or"),
        (["a=runs/a", "b=runs/b"], "a has no recorded fold"),
    ],
)
def test_the_command_says_what_is_wrong_with_its_members(tmp_path, members, error):
    record = tmp_path / "search" / "ens"
    command = [sys.executable, "-m", "experiments.ensemble_folds", f"--record={record}",
               *(f"--member={m}" for m in members)]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert proc.returncode != 0 and error in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_an_ensemble_of_one_run_twice_scores_as_that_run(tmp_path):
    """A tiny fold recorded under two names; their ensemble is that run, recorded as a recipe
    of the search (40-70 s on a 2-core CPU)."""
    config, workdir = tiny_crossval_config(), str(tmp_path / "cv")
    config.test_time_augmentation = True
    search_dir = tmp_path / "search"
    crossval.run_crossval(config, workdir, num_folds=2, folds=[0], compare_image_level=False)
    for name in ("a", "b"):
        assert fold_summary.record_finished_folds(workdir, str(search_dir / name)) == [0]
    member = search.read_recipe(str(search_dir / "a"))[0]
    record = str(search_dir / "a_and_b")
    members = {"a": workdir, "b": workdir}
    assert ensemble_folds.record_ensemble(record, members, {}) == [0]
    summary = search.read_recipe(record)[0]
    for key in search.CELL_METRICS:
        assert summary["validation"]["cell"][key] == pytest.approx(
            member["validation"]["cell"][key], abs=1e-6
        )
    assert summary["validation"]["patients"]["errors"] == member["validation"]["patients"]["errors"]
    assert summary["wall_seconds"] == pytest.approx(2 * member["wall_seconds"])
    assert summary["validation_names_sha256"] == member["validation_names_sha256"]
    report = run_folder.read_report(os.path.join(workdir, "fold_0"))
    test = run_folder.read_json(os.path.join(record, "fold_0_test.json"))
    assert test["cell"]["accuracy"] == pytest.approx(report["test"]["accuracy"], abs=1e-6)
    # One member with the slide prior: the member's validation log-odds, each slide moved.
    prior_record = str(search_dir / "a_slide_prior")
    with_prior = ensemble_folds.Scoring(slide_prior=True)
    assert ensemble_folds.record_ensemble(prior_record, {"a": workdir}, {}, with_prior) == [0]
    adjusted = search.read_recipe(prior_record)[0]
    assert adjusted["changes"] == "a, slide prior"
    fold_dir = os.path.join(workdir, "fold_0")
    ds = folds_lib.dataset_for_run(fold_dir, run_folder.read_config(fold_dir))
    outputs = fold_summary.validation_outputs(fold_dir, report, ds.validation)
    z = slide_prior.adjust(outputs["log_odds"], ds.validation.slide_ids, np.mean(ds.train.labels))
    expected = metrics.binary_metrics(outputs["labels"], 1 / (1 + np.exp(-z)))
    for key in ("accuracy", "auc", "sensitivity"):
        assert adjusted["validation"]["cell"][key] == pytest.approx(expected[key])
    # The recorded run's per-crop outputs, for the verdict rules: validation rows recomputed,
    # test rows the run's own; the unrecorded fold 1 is left, a written fold kept.
    out_dir = str(tmp_path / "fold_outputs")
    argv = ["runs", f"--search={search_dir}", f"--member=a={workdir}", f"--record={out_dir}"]
    fold_outputs.main(argv)
    with np.load(os.path.join(out_dir, "a_fold_0.npz")) as rows:
        val, test_rows = rows["split"] == "validation", rows["split"] == "test"
        np.testing.assert_allclose(rows["log_odds"][val], outputs["log_odds"], rtol=1e-5)
        np.testing.assert_array_equal(rows["name"][val], ds.validation.names)
        stored = run_folder.read_test_outputs(fold_dir)
        np.testing.assert_array_equal(rows["log_odds"][test_rows], stored["log_odds"])
        np.testing.assert_array_equal(rows["slide_id"][test_rows], stored["slide_ids"])
    assert [
        r["file"] for r in run_folder.read_json(os.path.join(out_dir, "summary.json"))["runs"]
    ] == ["a_fold_0.npz"]
    assert fold_summary.record_crop_outputs(str(search_dir), {"a": workdir}, out_dir, {}) == []
    # The fold trained again elsewhere (here: a record whose evaluation is not this run's): left
    # without --retrained; with it, its own outputs, marked a retrain beside the record's.
    elsewhere_dir = tmp_path / "search_elsewhere"
    shutil.copytree(search_dir / "a", elsewhere_dir / "a")
    path = elsewhere_dir / "a" / "fold_0.json"
    elsewhere = json.loads(path.read_text())
    elsewhere["evaluated"]["step"] += 1
    path.write_text(json.dumps(elsewhere))
    retrained_out = str(tmp_path / "fold_outputs_retrained")
    args = [str(elsewhere_dir), {"a": workdir}, retrained_out, {}]
    assert fold_summary.record_crop_outputs(*args) == []
    argv = ["runs", f"--search={elsewhere_dir}", f"--member=a={workdir}"]
    fold_outputs.main([*argv, f"--record={retrained_out}", "--retrained"])
    (entry,) = run_folder.read_json(os.path.join(retrained_out, "summary.json"))["runs"]
    step = report["training"]["evaluated_step"]
    assert "trained again" in entry["source"] and entry["evaluated"]["step"] == step
    assert entry["recorded"]["evaluated"]["step"] == step + 1
    assert entry["validation"]["accuracy"] == report["validation"]["accuracy"]
    with np.load(os.path.join(retrained_out, "a_fold_0.npz")) as again:
        np.testing.assert_array_equal(
            again["log_odds"], np.load(f"{out_dir}/a_fold_0.npz")["log_odds"]
        )
    # A run of another command is no retrain of the recorded fold.
    elsewhere["config"]["num_epochs"] += 1
    path.write_text(json.dumps(elsewhere))
    args[2] = str(tmp_path / "fold_outputs_other")
    assert fold_summary.record_crop_outputs(*args, retrained=True) == []
    rows = verdict_cv.load_fold(0, "validation", out_dir, ("a",))
    assert len(rows["name"]) == len(ds.validation.names)
    # The weights at the end of training: their outputs, not the run's evaluated checkpoint's.
    latest = ensemble_folds.Scoring(checkpoint="latest")
    assert ensemble_folds.record_ensemble(
        str(search_dir / "a_latest"), {"a": workdir}, {}, latest
    ) == [0]
    last = search.read_recipe(str(search_dir / "a_latest"))[0]
    assert last["changes"] == "a, latest checkpoint" and last["evaluated"]["checkpoint"] == "latest"
    classifier = run_folder.load_run(fold_dir, which="latest")
    logits = classifier.logits(ds.validation.images).astype(np.float64)
    probs = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
    expected = metrics.binary_metrics(ds.validation.labels, probs)
    assert last["validation"]["cell"]["auc"] == pytest.approx(expected["auc"])
    with pytest.raises(ValueError, match="'best' or 'latest'"):
        ensemble_folds.Scoring(checkpoint="first")
    # Recorded folds are skipped; a member whose runs are missing leaves the fold unscored.
    assert ensemble_folds.record_ensemble(record, members, {}) == []
    elsewhere = {"a": workdir, "b": str(tmp_path / "missing")}
    assert ensemble_folds.record_ensemble(str(search_dir / "other"), elsewhere, {}) == []
    # Another membership is another recipe.
    with pytest.raises(search.SearchError, match="another recipe"):
        ensemble_folds.record_ensemble(record, {"b": workdir, "a": workdir}, {})
    # The tables name it by its members.
    table = ablation.validation_tables(
        search.read_search(str(search_dir)), default.get_config().to_dict(), ablation.changes
    )
    assert "ensemble of a, b (mean log-odds)" in table


@pytest.mark.parametrize("member", ["a", "a=", "=w", "a=w --member=a=v"])
def test_fold_outputs_runs_refuses_a_malformed_member(member, capsys):
    argv = ["runs", "--search=s", "--record=r"] + [
        f"--member={m}" for m in member.split(" --member=")
    ]
    with pytest.raises(SystemExit) as exit_:
        fold_outputs.main(argv)
    assert exit_.value.code == 2 and "RECIPE=WORKDIR" in capsys.readouterr().err
