"""experiments.ablation: the changes a run makes, its validation row, the test mean +/- std."""

import json
import os

import pytest

from experiments import ablation
from experiments.configs import default

BASELINE = os.path.join(os.path.dirname(default.__file__), "default.py")


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


def test_test_summary_is_mean_and_sample_std_over_runs(tmp_path):
    runs = [fake_run(tmp_path / f"s{i}", acc, seed=i) for i, acc in enumerate((0.95, 0.96, 0.97))]
    table = ablation.test_table(runs)
    assert "| cell accuracy % | 96.00 +/- 1.00 | 95.00 / 96.00 / 97.00 |" in table
    assert "| patients right | 45 of 48 | C0P1, C1P1, C2P1 |" in table


def test_a_folder_without_a_report_is_named(tmp_path):
    with pytest.raises(ValueError, match="no report.json"):
        ablation.test_table([str(tmp_path)])
