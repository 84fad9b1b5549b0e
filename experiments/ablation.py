"""Tables of finished runs and of a recipe search: what each recipe changed, how it validated.

  python -m experiments.ablation runs/a runs/b ...          # one row per run, validation only
  python -m experiments.ablation --test runs/s0 runs/s1 runs/s2   # test figures, mean +/- std

A row names what the run's config.json changes against a baseline config (default.py unless
--baseline says otherwise), its wall time (data loading, training and evaluation) and its
validation metrics: the figures a recipe is chosen on. `--test` summarises the test splits of
finished runs (e.g. one recipe on three slide splits) as mean +/- sample std; keep it for the
recipe that validation chose. --out also writes the table to a markdown file.

A recipe search by patient-level cross-validation (experiments.search.records) is read from its
committed fold records, never from figures typed in:

  python -m experiments.ablation --search=experiments/results/search            # validation
  python -m experiments.ablation --search=experiments/results/search --paired=default
  python -m experiments.ablation --search=experiments/results/search --choose=RECIPE  # once
  python -m experiments.ablation --search=experiments/results/search --test     # after it

Validation tables give the mean +/- SD over folds (the sample standard deviation: how far
folds spread) and mark recipes with missing folds; --paired gives per-fold differences from a
reference recipe, their mean +/- SD and a 95% t interval of the mean; --choose records the
choice once (every fold recorded); --test prints the chosen recipe's test folds, and is
refused before the choice.
"""

import importlib.util
import json
import os
import sys

import numpy as np
from absl import app, flags

from experiments import _cli
from experiments.search import records as search
from experiments.search.tables import (
    IGNORED,
    changes,
    chosen_test_table,
    paired_table,
    validation_tables,
)
from mnres import run_folder

flags.DEFINE_string(
    "baseline",
    os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "Config file the changes are named against.",
)
flags.DEFINE_bool(
    "test",
    False,
    "Summarise the runs' test figures (mean +/- std) instead; with --search, the test folds of "
    "the chosen recipe (refused before --choose).",
)
flags.DEFINE_string("out", None, "Also write the table to this markdown file.")
flags.DEFINE_string(
    "search", None, "A recipe search's folder (experiments/results/search): its tables."
)
flags.DEFINE_list(
    "paired",
    None,
    "With --search: REFERENCE or REFERENCE,RECIPE: per-fold differences of every other recipe "
    "(or RECIPE) from REFERENCE, mean +/- SD and a 95% t interval.",
)
flags.DEFINE_enum(
    "metric",
    "accuracy",
    ["accuracy", "auc", "sensitivity", "specificity", "patient_auc"],
    "With --paired: the validation figure compared.",
)
flags.DEFINE_string(
    "choose",
    None,
    "With --search: choose this recipe (all its folds recorded) on the validation table; "
    "writes choice.json once, after which --test reads its test folds.",
)
FLAGS = flags.FLAGS

# A run's split seed has a column of its own, too.
_IGNORED_BY_RUNS = IGNORED | {"seed"}


def _baseline(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("baseline_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return search.flatten(module.get_config().to_dict())


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
        wall = run_folder.whole_run_seconds(training)
        changed = search.config_changes(search.run_recipe_config(r), baseline, _IGNORED_BY_RUNS)
        lines.append(
            f"| {os.path.basename(os.path.normpath(run))} | {r['config'].get('seed')} "
            f"| {changed} | {training['epochs']} "
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


def _search_output(search_dir: str) -> str:
    """The table a --search command prints (and --choose records with the choice)."""
    if FLAGS.test:
        if FLAGS.choose or FLAGS.paired:
            raise app.UsageError("--test prints the chosen recipe's test folds, and nothing else")
        return chosen_test_table(search_dir)
    found = search.read_search(search_dir)
    if FLAGS.paired:
        if FLAGS.choose:
            raise app.UsageError("--choose records the validation table, not --paired's")
        return paired_table(found, FLAGS.paired, FLAGS.metric)
    table = validation_tables(
        found, _baseline(FLAGS.baseline), changes, search.read_choice(search_dir)
    )
    if FLAGS.choose:
        choice = search.choose(search_dir, FLAGS.choose, table)
        table += (
            f"\n\nChose {choice['recipe']} ({choice['date']}): `--test` now prints its test folds."
        )
    return table


def main(argv):
    runs = argv[1:]
    if FLAGS.search and runs:
        raise app.UsageError("--search reads its recorded folds: give no run folders")
    if not (runs or FLAGS.search):
        raise app.UsageError("give one or more run folders (workdirs of experiments.malaria)")
    if not FLAGS.search and (FLAGS.choose or FLAGS.paired):
        raise app.UsageError("--choose and --paired work on a --search folder")
    try:
        if FLAGS.search:
            table = _search_output(FLAGS.search)
        elif FLAGS.test:
            table = test_table(runs)
        else:
            table = validation_table(runs, _baseline(FLAGS.baseline))
    except (ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
