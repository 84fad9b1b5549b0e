"""experiments.ablation: the changes a run makes, its validation row, the test mean +/- std,
and the command line of a recipe search."""

import json
import os
import subprocess
import sys

import pytest

from experiments import ablation
from experiments.configs import default

BASELINE = os.path.join(os.path.dirname(default.__file__), "default.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(path, accuracy, seed=0, **changes):
    """A run folder whose report.json holds the figures a finished run would."""
    config = default.get_config()
    config.seed = seed
    config.data.source = "folder"
    config.data.dir = "/somewhere/cell_images"
    for key, value in changes.items():
        node, _, field = key.rpartition(".")
        setattr(config.get(node) if node else config, field, value)
    figures = {"accuracy": accuracy, "auc": 0.99, "sensitivity": 0.95, "specificity": 0.97}
    report = {
        "config": config.to_dict(),
        "training": {"epochs": config.num_epochs, "wall_seconds_this_run": 600.0},
        "validation": figures,
        "test": dict(figures, f1=0.96),
        "test_patient": {
            "n_patients": 16,
            "accuracy": 15 / 16,
            "per_slide_accuracy": {"min": 0.8},
            "errors": [f"C{seed}P1"],  # misclassified slide ids, as mnres.metrics lists them
        },
    }
    os.makedirs(path)
    with open(os.path.join(path, "report.json"), "w") as f:
        json.dump(report, f)
    return str(path)


def test_validation_rows_name_only_the_recipe_changes(tmp_path):
    base = fake_run(tmp_path / "base", 0.9644)
    wide = fake_run(
        tmp_path / "wide",
        0.97,
        **{"model.alpha": 0.5, "data.image_size": 96, "test_time_augmentation": False},
    )
    table = ablation.validation_table([base, wide], ablation._baseline(BASELINE))
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| base | 0 | (baseline) | 20 | 8 views | 10.0 | 96.44 | 0.9900 |")
    assert "| data.image_size=96, model.alpha=0.5 |" in rows[1]  # not the data folder or source
    assert "| 20 | - | 10.0 | 97.00 |" in rows[1]


def test_a_momentum_the_loop_picked_is_no_change(tmp_path):
    run = fake_run(tmp_path / "picked", 0.96, **{"model.bn_momentum": 0.9899})
    report = json.load(open(os.path.join(run, "report.json")))
    baseline = ablation._baseline(BASELINE)
    assert "model.bn_momentum=0.9899" in ablation.validation_table([run], baseline)
    report["model"] = {"bn_momentum_picked": True}
    json.dump(report, open(os.path.join(run, "report.json"), "w"))
    assert "| picked | 0 | (baseline) |" in ablation.validation_table([run], baseline)


def test_test_summary_is_mean_and_sample_std_over_runs(tmp_path):
    runs = [fake_run(tmp_path / f"s{i}", acc, seed=i) for i, acc in enumerate((0.95, 0.96, 0.97))]
    table = ablation.test_table(runs)
    assert "| cell accuracy % | 96.00 +/- 1.00 | 95.00 / 96.00 / 97.00 |" in table
    assert "| patients right | 45 of 48 | C0P1, C1P1, C2P1 |" in table


def test_a_folder_without_a_report_is_named(tmp_path):
    with pytest.raises(ValueError, match="no report.json"):
        ablation.test_table([str(tmp_path)])


def test_search_commands_refuse_test_figures_before_the_choice(tmp_path):
    """The command line of a recipe search: validation table, sealed test, one choice."""
    from test_search import two_recipes  # synthetic fold records

    two_recipes(tmp_path)
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "experiments.ablation", f"--search={tmp_path}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    sealed = run("--test")
    assert sealed.returncode == 1 and "no recipe is chosen yet" in sealed.stderr
    assert "base" not in sealed.stdout
    chosen = run("--choose=base", f"--out={tmp_path / 'table.md'}")
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    assert (
        "| base | 5/5 | (baseline) |" in chosen.stdout
        and "| ema | 3/5 (partial) |" in chosen.stdout
    )
    assert "Chose base" in (tmp_path / "table.md").read_text()
