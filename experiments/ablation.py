"""Tables of finished runs: what each trial changed and how it validated, and test means.

  python -m experiments.ablation runs/a runs/b ...          # one row per run, validation only
  python -m experiments.ablation --test runs/s0 runs/s1 runs/s2   # test figures, mean +/- std

A row names what the run's config.json changes against a baseline config (default.py unless
--baseline says otherwise), its wall time (data loading, training and evaluation) and its
validation metrics: the figures a recipe is chosen on. `--test` summarises the test splits of
finished runs (e.g. one recipe on three slide splits) as mean +/- sample std; keep it for the
recipe that validation chose. --out also writes the table to a markdown file.
"""

import importlib.util
import json
import os
import sys

import numpy as np
from absl import app, flags

from mnres import config_validation

flags.DEFINE_string(
    "baseline",
    os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "Config file the changes are named against.",
)
flags.DEFINE_bool("test", False, "Summarise the runs' test figures (mean +/- std) instead.")
flags.DEFINE_string("out", None, "Also write the table to this markdown file.")
FLAGS = flags.FLAGS

# Where the data lives and how it is shown say nothing about the recipe.
_IGNORED = {
    "data.source",
    "data.dir",
    "data.cache_dir",
    "data.test_dir",
    "data.tfds_data_dir",
    "data.num_workers",
    "progress_bar",
    "seed",
    "test_time_augmentation",  # a column of its own
}
_CELL = ("accuracy", "auc", "sensitivity", "specificity")


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = tuple(value) if isinstance(value, list) else value
    return out


def _baseline(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("baseline_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _flatten(module.get_config().to_dict())


def changes(config: dict, baseline: dict) -> str:
    """`key=value` for every recipe field of `config` that differs from `baseline`."""
    flat = _flatten(config)
    diff = [
        f"{key}={flat.get(key)}"
        for key in sorted(set(flat) | set(baseline))
        # A key the run's config lacks predates the option: the run had no such change.
        if key not in _IGNORED and key in flat and flat[key] != baseline.get(key)
    ]
    return ", ".join(diff) or "(baseline)"


def load(run: str) -> dict:
    path = os.path.join(run, "report.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run} has no report.json: not a finished run of experiments.malaria")
    with open(path) as f:
        return json.load(f)


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x, digits: int):
    return "-" if x is None else f"{x:.{digits}f}"


def validation_table(runs, baseline: dict) -> str:
    lines = [
        "| run | split seed | changes vs baseline | epochs | TTA | wall (min) | val acc % "
        "| val AUC | val sens % | val spec % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r = load(run)
        val, training = r["validation"] or {}, r["training"]
        wall = training.get("wall_seconds_this_run")
        lines.append(
            f"| {os.path.basename(os.path.normpath(run))} | {r['config'].get('seed')} "
            f"| {changes(r['config'], baseline)} | {training['epochs']} "
            f"| {'8 views' if r['config'].get('test_time_augmentation') else '-'} "
            f"| {_num(wall and wall / 60, 1)} | {_pct(val.get('accuracy'))} "
            f"| {_num(val.get('auc'), 4)} "
            f"| {_pct(val.get('sensitivity'))} | {_pct(val.get('specificity'))} |"
        )
    return "\n".join(lines)


def _mean_std(values, scale=1.0, digits=2):
    values = np.asarray(values, np.float64) * scale
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} +/- {std:.{digits}f}"


def test_table(runs) -> str:
    reports = [load(run) for run in runs]
    rows = [
        ("cell accuracy %", [r["test"]["accuracy"] for r in reports], 100, 2),
        ("AUC", [r["test"]["auc"] for r in reports], 1, 4),
        ("sensitivity %", [r["test"]["sensitivity"] for r in reports], 100, 2),
        ("specificity %", [r["test"]["specificity"] for r in reports], 100, 2),
        ("F1", [r["test"]["f1"] for r in reports], 1, 3),
    ]
    patients = [r["test_patient"] for r in reports]
    if all(patients):
        rows.append(
            ("worst test slide, cell accuracy %",
             [p["per_slide_accuracy"]["min"] for p in patients], 100, 1)
        )  # fmt: skip
    lines = [
        "| test (mean +/- std over " + f"{len(runs)} runs) | value | per run |",
        "|---|---|---|",
    ]
    for name, values, scale, digits in rows:
        each = " / ".join(f"{v * scale:.{digits}f}" for v in values)
        lines.append(f"| {name} | {_mean_std(values, scale, digits)} | {each} |")
    if all(patients):
        right = sum(round(p["accuracy"] * p["n_patients"]) for p in patients)
        total = sum(p["n_patients"] for p in patients)
        wrong = [slide for p in patients for slide in p["errors"]]  # misclassified slide ids
        lines.append(f"| patients right | {right} of {total} | {', '.join(wrong) or 'no errors'} |")
    return "\n".join(lines)


def main(argv):
    runs = argv[1:]
    if not runs:
        raise app.UsageError("give one or more run folders (workdirs of experiments.malaria)")
    try:
        table = (
            test_table(runs) if FLAGS.test else validation_table(runs, _baseline(FLAGS.baseline))
        )
    except (ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=config_validation.parse_command_line)
