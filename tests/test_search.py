"""The recipe search: fold records, mean +/- SD tables, paired differences, one sealed choice."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
from data_fixtures import tiny_crossval_config

from experiments import ablation
from experiments.configs import default, smoke
from experiments.search import fold_summary, tables
from experiments.search import records as search
from mnres import config as config_lib
from mnres import metrics, run_folder
from mnres.data import folds as folds_lib
from mnres.data.splits import Split
from mnres.training import crossval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = search.flatten(default.get_config().to_dict())
SPEC = {"num_folds": 5, "split_by": "slide", "validation_fraction": 0.1 / 0.9, "seed": 0,
        "source": "folder", "image_size": 64}  # fmt: skip


def fake_fold(search_dir, recipe, fold, accuracy, *, names="val", **changes):
    """Records fold `fold` of `recipe` as a finished run would have it (synthetic figures)."""
    config = default.get_config()
    config.data.source, config.data.dir = "folder", "/machine/cell_images"
    for key, value in changes.items():
        node, _, field = key.rpartition(".")
        setattr(config.get(node) if node else config, field, value)
    config = search.recipe_config(config)
    cell = {"accuracy": accuracy, "auc": 0.99, "sensitivity": 0.95, "specificity": 0.97, "n": 100}
    summary = {
        "recipe": recipe,
        "fold": fold,
        "num_folds": 5,
        "spec": SPEC,
        "config": config,
        "changes": search.config_changes(config, BASELINE),
        "validation": {
            "cell": cell,
            "patients": {"n_patients": 14, "right": 13, "auc": 0.9 + 0.01 * fold},
        },
        "validation_names_sha256": f"{names}{fold}",
        "evaluated": {"checkpoint": "best", "step": 100, "test_time_augmentation": True},
        "epochs": config["num_epochs"],
        "wall_seconds": 600.0,
        "provenance": {"cpu": "Some CPU", "commit": "abc", "dirty": False, "versions": {}},
    }
    test = {
        "recipe": recipe,
        "fold": fold,
        "cell": dict(cell, accuracy=accuracy - 0.01, f1=0.96),
        "patients": {"n_patients": 32, "accuracy": 31 / 32, "sensitivity": 1.0,
                     "specificity": 0.9, "errors": [f"C{fold}N"]},
    }  # fmt: skip
    search.record_fold(os.path.join(search_dir, recipe), summary, test)


def two_recipes(search_dir):
    """'base' with all 5 folds; 'ema' with 3 (partial), 0.5 points better on each."""
    for k in range(5):
        fake_fold(search_dir, "base", k, 0.95 + 0.002 * k)
    for k in range(3):
        fake_fold(search_dir, "ema", k, 0.955 + 0.002 * k, ema_decay=0.999)
    return search.read_search(search_dir)


def test_mean_sd_and_standard_error():
    s = search.mean_sd([0.9, 0.8, None, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["n"] == 3
    assert s["sd"] == pytest.approx(np.std([0.9, 0.8, 1.0], ddof=1)) == pytest.approx(0.1)
    assert s["se"] == pytest.approx(0.1 / np.sqrt(3))  # kept: t intervals, older choice.json
    assert search.mean_sd([0.5]) == {"mean": 0.5, "sd": None, "se": None, "n": 1}
    assert search.mean_sd([None])["mean"] is None


def test_table_is_built_from_the_files_and_marks_partial_recipes(tmp_path):
    found = two_recipes(tmp_path)
    scores = search.recipe_scores(found["ema"])
    assert not scores["complete"] and scores["folds"] == [0, 1, 2]
    assert search.recipe_scores(found["base"])["complete"]
    table = ablation.validation_tables(found, BASELINE, ablation.changes)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    base = np.array([0.95 + 0.002 * k for k in range(5)]) * 100
    pm = f"{base.mean():.2f} +/- {np.std(base, ddof=1):.2f}"  # the SD over folds, not the SE
    assert pm == "95.40 +/- 0.32"
    assert rows[1].startswith(f"| base | 5/5 | (baseline) | 20 | 8 views | 10.0 +/- 0.0 | {pm} |")
    assert rows[1].endswith("| 65 of 70 (84-97%) | 0.920 +/- 0.016 |")  # Wilson 95%
    assert "mean +/- SD over folds" in table and "standard error" not in table
    assert rows[2].startswith("| ema | 3/5 (partial) | ema_decay=0.999 |")
    assert "| ema | 95.50 | 95.70 | 95.90 | - | - |" in table  # per fold, missing ones shown
    assert "Partial (folds missing): ema" in table
    assert "machine" not in json.dumps(found)  # no machine path in the records


def test_the_validation_path_never_opens_test_figures(tmp_path, monkeypatch):
    found = two_recipes(tmp_path)
    opened = []
    real = run_folder.read_json
    monkeypatch.setattr(run_folder, "read_json", lambda p: opened.append(p) or real(p))
    found = search.read_search(tmp_path)
    ablation.validation_tables(found, BASELINE, ablation.changes)
    ablation.paired_table(found, ["base"])
    search.choose(str(tmp_path), "base", "table")
    assert opened and not [p for p in opened if p.endswith("_test.json")]
    search.read_test(str(tmp_path), "base")  # the one reader of the test figures
    assert [p for p in opened if p.endswith("_test.json")]


def test_choice_is_made_once_on_a_complete_recipe(tmp_path):
    two_recipes(tmp_path)
    with pytest.raises(search.SearchError, match="3 of 5 folds"):
        search.choose(str(tmp_path), "ema", "table")
    with pytest.raises(search.SearchError, match="no recipe 'wide'"):
        search.choose(str(tmp_path), "wide", "table")
    choice = search.choose(str(tmp_path), "base", "the table")
    record = json.load(open(tmp_path / search.CHOICE_JSON))
    assert record["recipe"] == "base" and record["table"] == "the table" and record["date"]
    assert record == json.loads(run_folder.json_text(choice))
    with pytest.raises(search.SearchError, match="base was chosen on .*chooses once"):
        search.choose(str(tmp_path), "ema", "table")
    with pytest.raises(search.SearchError, match="chooses once"):
        search.choose(str(tmp_path), "base", "table")


def test_test_figures_are_sealed_until_the_choice_and_for_other_recipes(tmp_path):
    two_recipes(tmp_path)
    with pytest.raises(search.SearchError, match="no recipe is chosen yet"):
        search.read_test(str(tmp_path), "base")
    with pytest.raises(search.SearchError, match="no recipe is chosen yet"):
        ablation.chosen_test_table(str(tmp_path))
    search.choose(str(tmp_path), "base", "table")
    with pytest.raises(search.SearchError, match="base was chosen, not ema"):
        search.read_test(str(tmp_path), "ema")
    tests = search.read_test(str(tmp_path), "base")
    assert sorted(tests) == [0, 1, 2, 3, 4]
    table = ablation.chosen_test_table(str(tmp_path))
    assert "| cell accuracy % | 94.40 +/- 0.32 |" in table  # the SD over the 5 folds
    assert "| patients right | 155 of 160 (93-99%) | 31 of 32 / 31 of 32 / " in table
    assert "| patients called wrong | 5 | C0N, C1N, C2N, C3N, C4N |" in table
    # Records without the class counts: patient sensitivity as the mean +/- SD over folds.
    assert "| patient sensitivity % | 100.0 +/- 0.0 |" in table
    # A record changed after the choice is refused too.
    path = tmp_path / "base" / "fold_2.json"
    path.write_text(path.read_text().replace('"right": 13', '"right": 14'))
    with pytest.raises(search.SearchError, match="changed since the choice"):
        search.read_test(str(tmp_path), "base")


def test_paired_differences(tmp_path):
    found = two_recipes(tmp_path)
    d = search.paired_differences(found["base"], found["ema"])
    assert d["n"] == 3 and sorted(d["per_fold"]) == [0, 1, 2]
    assert d["mean"] == pytest.approx(0.005) and d["se"] == pytest.approx(0.0, abs=1e-12)
    table = ablation.paired_table(found, ["base"])
    assert "| ema - base | +0.50 | +0.50 | +0.50 | - | - | +0.50 +/- 0.00 |" in table
    assert table.splitlines()[-1].endswith("| 3/5 |")
    auc = ablation.paired_table(found, ["ema", "base"], "patient_auc")
    assert "| base - ema | +0.000 | +0.000 | +0.000 | - | - |" in auc
    fake_fold(tmp_path, "other_seed", 0, 0.9, names="seed1")
    found = search.read_search(tmp_path)
    assert search.incomparable(found) == ["other_seed"]
    with pytest.raises(search.SearchError, match="different crops"):
        search.paired_differences(found["base"], found["other_seed"])


def test_paired_rows_give_the_sd_and_the_t_interval_of_the_mean(tmp_path):
    two_recipes(tmp_path)
    steps = [0.001, 0.003, 0.002, 0.004, 0.005]
    for k, step in enumerate(steps):
        fake_fold(tmp_path, "wide", k, 0.95 + 0.002 * k + step, **{"model.alpha": 0.5})
    found = search.read_search(tmp_path)
    d = np.array(steps) * 100
    sd = np.std(d, ddof=1)
    half = scipy.stats.t.ppf(0.975, 4) * sd / np.sqrt(5)  # the interval uses SD / sqrt(n)
    expected = f"| +{d.mean():.2f} +/- {sd:.2f} | {d.mean() - half:+.2f} to {d.mean() + half:+.2f}"
    assert expected == "| +0.30 +/- 0.16 | +0.10 to +0.50"
    assert expected + " | 5/5 |" in ablation.paired_table(found, ["base", "wide"])
    levers = tables.lever_table(found, [("wider", "base", "wide")])
    assert f"| wider | wide - base | 5/5 {expected} | 5 / 0 |" in levers
    assert levers.endswith("| 65 -> 65 |")


def test_test_patients_are_pooled_over_folds_with_wilson_intervals():
    cell = {"accuracy": 0.95, "auc": 0.99, "sensitivity": 0.95, "specificity": 0.97, "f1": 0.96}
    tests = {
        k: {"cell": cell, "patients": {"n_patients": 32, "n_infected": 24, "accuracy": 29 / 32,
                                       "sensitivity": (21 + k % 2) / 24, "specificity": 7 / 8,
                                       "errors": []}}
        for k in range(5)
    }  # fmt: skip
    s = search.chosen_test_scores(tests)
    assert (s["infected_right"], s["infected"]) == (107, 120)
    assert (s["uninfected_right"], s["uninfected"]) == (35, 40)
    assert s["patient_sensitivity"]["sd"] is not None  # the stored mean +/- SD stays


def test_a_recipe_folder_holds_one_recipe(tmp_path):
    fake_fold(tmp_path, "base", 0, 0.95)
    with pytest.raises(search.SearchError, match="another recipe .*model.alpha"):
        fake_fold(tmp_path, "base", 1, 0.95, **{"model.alpha": 0.5})
    fake_fold(tmp_path, "base", 0, 0.95)  # the same fold again: nothing to do
    with pytest.raises(search.SearchError, match="recorded from another run"):
        fake_fold(tmp_path, "base", 0, 0.96)
    assert sorted(os.listdir(tmp_path / "base")) == ["fold_0.json", "fold_0_test.json"]


def test_a_config_field_added_later_and_left_off_is_the_same_recipe(tmp_path):
    fake_fold(tmp_path, "base", 0, 0.95)
    record = tmp_path / "base" / "fold_0.json"
    older = json.loads(record.read_text())
    del older["config"]["model"]["input_normalization"]  # recorded before the field existed
    record.write_text(json.dumps(older))
    fake_fold(tmp_path, "base", 1, 0.95)  # the field at 'none': the same recipe
    with pytest.raises(search.SearchError, match="another recipe .*input_normalization"):
        fake_fold(tmp_path, "base", 2, 0.95, **{"model.input_normalization": "gray_world"})


def _slides(fractions_infected, fractions_uninfected, n=100):
    labels, probs, slides = [], [], []
    for i, f in enumerate(fractions_infected + fractions_uninfected):
        called = np.arange(n) < round(f * n)
        labels += [int(i < len(fractions_infected) and c) for c in called]
        probs += list(np.where(called, 0.9, 0.1))
        slides += [f"S{i}"] * n
    return np.array(labels), np.array(probs), np.array(slides)


def test_validation_patients_leave_each_patient_out():
    # In-sample, a threshold between 0.03 and 0.04 calls all 5 right. Left out, S2 (infected,
    # 4% of its cells called) falls below the threshold the others give (0.265), and S4
    # (uninfected, 3%) above theirs (0.02): each decision is made without its own patient.
    labels, probs, slides = _slides([0.6, 0.5, 0.04], [0.0, 0.03])
    patients = fold_summary.validation_patients(labels, probs, slides)
    assert 0.03 < patients["fraction_threshold"] < 0.04
    assert metrics.patient_metrics(labels, probs, slides, patients["fraction_threshold"])[
        "errors"
    ] == []  # fmt: skip
    assert patients["right"] == 3 and patients["errors"] == ["S2", "S4"]
    assert patients["sensitivity"] == pytest.approx(2 / 3) and patients["specificity"] == 0.5
    assert [r["fraction_threshold"] for r in patients["slides"]][2::2] == pytest.approx(
        [0.265, 0.02]
    )
    assert patients["auc"] == 1.0  # the fractions themselves rank the patients perfectly
    easy = fold_summary.validation_patients(*_slides([0.6, 0.5, 0.4], [0.0, 0.05]))
    assert easy["right"] == 5 and easy["errors"] == []
    assert fold_summary.validation_patients(labels, probs, np.full(len(labels), "")) is None


def _tiny_config(tmp_path):
    config = tiny_crossval_config()
    config.test_time_augmentation = True
    config.data.cache_dir = str(tmp_path / "cache")  # a machine path that must not be recorded
    return config


@pytest.mark.slow
def test_a_fold_folder_is_summarised_and_recorded(tmp_path):
    """One tiny fold, recorded as it finishes; then summarised again from its folder (50-80 s
    on a 2-core CPU shared with another training)."""
    config, workdir = _tiny_config(tmp_path), str(tmp_path / "cv")
    record = str(tmp_path / "search" / "tiny")

    def after_fold(fold_dir, dataset):
        summary, test = fold_summary.summarize_fold(
            fold_dir, "tiny", baseline=default.get_config().to_dict(), dataset=dataset
        )
        assert search.record_fold(record, summary, test)

    crossval.run_crossval(config, workdir, num_folds=2, folds=[0], compare_image_level=False,
                          after_fold=after_fold)  # fmt: skip
    recorded = search.read_recipe(record)
    assert list(recorded) == [0]
    summary, report = recorded[0], run_folder.read_report(os.path.join(workdir, "fold_0"))
    assert summary["recipe"] == "tiny" and summary["num_folds"] == 2
    for key in search.CELL_METRICS:
        assert summary["validation"]["cell"][key] == report["validation"][key]
    patients = summary["validation"]["patients"]
    manifest = run_folder.read_manifest(os.path.join(workdir, "fold_0"))
    assert patients["n_patients"] == manifest["splits"]["validation"]["num_slides"]
    assert "model.name=mobilenet_v1_residual" in summary["changes"]
    assert summary["evaluated"]["test_time_augmentation"] is True
    assert summary["wall_seconds"] > 0 and summary["provenance"]["versions"]["jax"]
    text = "".join(open(os.path.join(record, name)).read() for name in os.listdir(record))
    assert str(tmp_path) not in text and "PATH/cache" in text
    # Rebuilt from the folder alone (as --summarize_only does): the same figures.
    again = str(tmp_path / "search" / "again")
    assert fold_summary.record_finished_folds(workdir, again) == [0]
    rebuilt = search.read_recipe(again)[0]
    assert rebuilt["validation"]["patients"] == patients
    assert fold_summary.record_finished_folds(workdir, again) == []  # recorded already
    assert fold_summary.record_finished_folds(workdir, record) == []
    # Outputs that are not the evaluated run's (other crops or weights) are refused.
    report["validation"]["accuracy"] -= 0.2
    run_folder.write_json(os.path.join(workdir, "fold_0", "report.json"), report)
    with pytest.raises(ValueError, match="disagrees with report.json"):
        fold_summary.summarize_fold(os.path.join(workdir, "fold_0"), "tiny")


def test_the_command_skips_recorded_folds_in_any_workdir(tmp_path):
    """Folds recorded in the search are not run again, e.g. on another machine."""
    config = smoke.get_config()
    config.num_epochs = 1
    spec = folds_lib.fold_spec(config, 2, "slide")
    record = tmp_path / "search" / "smoke"
    for k in range(2):
        summary = {"recipe": "smoke", "fold": k, "num_folds": 2, "spec": spec,
                   "config": search.recipe_config(config), "validation_names_sha256": "x",
                   "validation": {"cell": {"accuracy": 0.9}}, "evaluated": {"step": 1}}  # fmt: skip
        search.record_fold(str(record), summary, {"fold": k})
    command = [sys.executable, "-m", "experiments.crossval",
               "--config=experiments/configs/smoke.py", "--config.num_epochs=1", "--num_folds=2",
               f"--workdir={tmp_path / 'elsewhere'}", f"--record={record}"]  # fmt: skip
    proc = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Every fold asked for is recorded" in proc.stderr
    assert not os.path.exists(tmp_path / "elsewhere")  # nothing trained
    config.model.alpha = 0.5  # another recipe under the same name is refused before training
    with pytest.raises(search.SearchError, match=r"another recipe \(model.alpha differ\)"):
        search.check_same_recipe(str(record), search.recipe_config(config), spec)


def test_the_agreement_check_compares_as_the_run_computed(monkeypatch):
    """A confident model's P(parasitized) rounds to 1.0 in float32, as the run computes it:
    the recomputed outputs tie there too, so its AUC agrees with report.json's."""
    log_odds = np.array([30.0, 25.0, 20.0, -1.0, 2.0, -30.0])
    labels = np.array([0, 1, 1, 0, 1, 0])  # the most confident crop is uninfected
    logits = np.stack([np.zeros_like(log_odds), log_odds], axis=1).astype(np.float32)

    class Loaded:
        metadata = {"step": 5}

        def logits(self, images, batch_size):
            return logits

    monkeypatch.setattr(run_folder, "load_run", lambda fold_dir, which: Loaded())
    config = config_lib.from_overrides({"eval_batch_size": 8})  # as read_config gives it
    monkeypatch.setattr(run_folder, "read_config", lambda fold_dir: config)
    reported = metrics.binary_metrics(labels, (1 / (1 + np.exp(-log_odds))).astype(np.float32))
    exact = metrics.binary_metrics(labels, 1 / (1 + np.exp(-log_odds)))
    assert abs(exact["auc"] - reported["auc"]) > 0.1  # the ties matter here
    split = Split(
        np.zeros((6, 8, 8, 3), np.uint8), labels, np.array(["S"] * 6), np.array(["c"] * 6)
    )
    report = {"training": {"evaluated_step": 5}, "validation": reported}
    outputs = fold_summary.validation_outputs("fold", report, split)
    np.testing.assert_allclose(outputs["log_odds"], log_odds)


def test_a_collapsed_run_agrees_on_its_cells_not_on_rounding_noise(monkeypatch):
    """A run that gives one output for every crop (its logits equal up to the last bits) ranks
    rounding noise: two evaluations of it give different AUCs, which is no sign of other crops
    or weights. Its n and accuracy still have to agree."""
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 0])
    jitter = labels.astype(np.float32) * np.float32(1e-6)  # ranks every crop right, by noise
    logits = np.stack([np.full(8, -0.1, np.float32), np.float32(-0.04) + jitter], axis=1)

    class Loaded:
        metadata = {"step": 5}

        def logits(self, images, batch_size):
            return logits

    monkeypatch.setattr(run_folder, "load_run", lambda fold_dir, which: Loaded())
    config = config_lib.from_overrides({"eval_batch_size": 8})
    monkeypatch.setattr(run_folder, "read_config", lambda fold_dir: config)
    split = Split(
        np.zeros((8, 8, 8, 3), np.uint8), labels, np.array(["S"] * 8), np.array(["c"] * 8)
    )
    reported = {"n": 8, "accuracy": 0.5, "auc": 0.5}  # what the run's own rounding gave
    report = {"training": {"evaluated_step": 5}, "validation": reported}
    assert fold_summary.validation_outputs("fold", report, split)["probs"].shape == (8,)
    report["validation"] = {**reported, "accuracy": 0.0}  # other cells: still refused
    with pytest.raises(ValueError, match="disagrees with report.json"):
        fold_summary.validation_outputs("fold", report, split)


def test_a_record_names_each_teacher_of_a_list_without_machine_paths():
    config = default.get_config()
    config.data.dir = "/machine/cell_images"
    config.distill.teacher = "/machine/runs/a/fold_{fold},/machine/runs/a_seed1/fold_{fold}"
    recorded = search.recipe_config(config)
    assert recorded["distill"]["teacher"] == "PATH/a/fold_{fold},PATH/a_seed1/fold_{fold}"
    assert recorded["data"]["dir"] == "PATH/cell_images"
    config.distill.teacher = "runs/ensemble"  # relative: as given
    assert search.recipe_config(config)["distill"]["teacher"] == "runs/ensemble"
