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

Validation tables give the mean +/- standard error over folds (sample std / sqrt(n)) and mark
recipes with missing folds; --paired gives per-fold differences from a reference recipe;
--choose records the choice once (every fold recorded); --test prints the chosen recipe's
test folds, and is refused before the choice.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import scipy.stats
from absl import app, flags

from experiments import _cli
from experiments.search import records as search

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
    "(or RECIPE) from REFERENCE, mean +/- standard error.",
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

# Where the data lives, how the run is executed and how it is shown say nothing about the
# recipe; test-time augmentation has a column of its own, and so has a run's split seed.
_IGNORED = search.NOT_RECIPE | {"test_time_augmentation"}
_IGNORED_BY_RUNS = _IGNORED | {"seed"}


def _baseline(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("baseline_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return search.flatten(module.get_config().to_dict())


def changes(config: dict, baseline: dict) -> str:
    """`key=value` for every recipe field of `config` that differs from `baseline`."""
    return search.config_changes(config, baseline, _IGNORED)


def _as_given(report: dict) -> dict:
    """The run's config as its command gave it: a BatchNorm momentum the loop picked is unset."""
    picked = (report.get("model") or {}).get("bn_momentum_picked")
    return search.recipe_config(report["config"], picked)


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
        changed = search.config_changes(_as_given(r), baseline, _IGNORED_BY_RUNS)
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


# ---------------------------------------------------------------------------------------------
# A recipe search's tables, from its recorded folds (experiments.search.records).

_SEARCH_COLUMNS = (  # header, validation figure, scale, digits
    ("val acc %", "accuracy", 100, 2),
    ("val AUC", "auc", 1, 4),
    ("val sens %", "sensitivity", 100, 2),
    ("val spec %", "specificity", 100, 2),
)
_SCALES = {"accuracy": (100, 2), "sensitivity": (100, 2), "specificity": (100, 2),
           "auc": (1, 4), "patient_auc": (1, 3)}  # fmt: skip


def _pm(entry, scale=1.0, digits=2, sign="") -> str:
    """'mean +/- standard error'; the mean alone for one value, '-' for none."""
    if entry["mean"] is None:
        return "-"
    mean = f"{entry['mean'] * scale:{sign}.{digits}f}"
    return mean if entry["se"] is None else f"{mean} +/- {entry['se'] * scale:.{digits}f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _search_notes(found, scores, choice) -> list[str]:
    notes = []
    partial = [name for name, s in scores.items() if not s["complete"]]
    if partial:
        notes.append(
            f"Partial (folds missing): {', '.join(partial)}; their means are over the folds "
            "recorded, so compare them on common folds (--paired)."
        )
    other = search.incomparable(found)
    if other:
        notes.append(f"Not comparable (other folds than {next(iter(found))}): {', '.join(other)}.")
    cpus = {}
    for folds in found.values():
        for summary in folds.values():
            cpu = summary["provenance"].get("cpu") or "unknown CPU"
            cpus[cpu] = cpus.get(cpu, 0) + 1
    notes.append("Folds ran on: " + "; ".join(f"{c} ({n})" for c, n in sorted(cpus.items())) + ".")
    if choice:
        notes.append(f"Chosen: {choice['recipe']} on {choice['date']} (choice.json).")
    return notes


def validation_tables(found: dict, baseline: dict, describe, choice=None) -> str:
    """A search's validation table (mean +/- SE over folds) and its per-fold accuracies.

    Args:
      found: `search.read_search`: {recipe: {fold: validation summary}}.
      baseline: the config the changes are named against (flat or nested).
      describe: (config, baseline) -> the changes' text (`changes`).
      choice: `search.read_choice`, to mark the chosen recipe.
    """
    if not found:
        raise ValueError("the search folder holds no recorded fold yet")
    scores = {name: search.recipe_scores(folds) for name, folds in found.items()}
    # Complete recipes first, the best mean validation accuracy first; then partial ones.
    order = sorted(found, key=lambda n: (not scores[n]["complete"], -scores[n]["accuracy"]["mean"]))
    header = [
        "recipe",
        "folds",
        "changes vs baseline",
        "epochs",
        "TTA",
        "wall/fold (min)",
        *(c[0] for c in _SEARCH_COLUMNS),
        "val patients right",
        "val patient AUC",
    ]
    lines = [
        "Validation slides of each fold; mean +/- standard error over folds (sample std / "
        "sqrt(n)). Patients: each called with the fraction threshold chosen on the fold's other "
        "validation patients.",
        "",
        _row(header),
        "|" + "---|" * len(header),
    ]
    for name in order:
        s, first = scores[name], next(iter(found[name].values()))
        right = "-" if s["patients"] is None else f"{s['patients_right']} of {s['patients']}"
        lines.append(_row([
            name + (" (chosen)" if choice and choice["recipe"] == name else ""),
            f"{len(s['folds'])}/{s['num_folds']}" + ("" if s["complete"] else " (partial)"),
            # An ensemble of recorded recipes is named by its members, not by config fields.
            first["changes"] if "ensemble" in first["config"]
            else describe(first["config"], baseline),
            first["epochs"],
            "8 views" if first["evaluated"]["test_time_augmentation"] else "-",
            _pm(s["wall_seconds"], 1 / 60, 1),
            *(_pm(s[m], scale, digits) for _, m, scale, digits in _SEARCH_COLUMNS),
            right,
            _pm(s["patient_auc"], 1, 3),
        ]))  # fmt: skip
    k = max(s["num_folds"] for s in scores.values())
    lines += ["", _row(["val acc % per fold", *(f"fold {i}" for i in range(k))])]
    lines.append("|" + "---|" * (k + 1))
    for name in order:
        accuracy = {i: f["validation"]["cell"]["accuracy"] for i, f in found[name].items()}
        lines.append(_row([name, *(_pct(accuracy.get(i)) for i in range(k))]))
    return "\n".join([*lines, "", *_search_notes(found, scores, choice)])


def paired_table(found: dict, paired: list[str], metric: str = "accuracy") -> str:
    """Per-fold differences of validation `metric`: each recipe minus the reference."""
    reference, others = paired[0], paired[1:] or [n for n in found if n != paired[0]]
    missing = [n for n in [reference, *others] if n not in found]
    if not others:
        raise ValueError(f"{reference} is the only recipe recorded: nothing to compare it with")
    if missing:
        raise ValueError(f"no recipe {', '.join(missing)} in the search: {', '.join(found)}")
    scale, digits = _SCALES[metric]
    k = found[reference][next(iter(found[reference]))]["num_folds"]
    unit = " (points)" if scale == 100 else ""
    header = [f"val {metric}{unit}: recipe - {reference}", *(f"fold {i}" for i in range(k)),
              "mean +/- SE", "95% interval (t)", "folds"]  # fmt: skip
    lines = [_row(header), "|" + "---|" * len(header)]
    for name in others:
        d = search.paired_differences(found[reference], found[name], metric)
        interval = "-"
        if d["se"] is not None:
            half = scipy.stats.t.ppf(0.975, d["n"] - 1) * d["se"] * scale
            low, high = d["mean"] * scale - half, d["mean"] * scale + half
            interval = f"{low:+.{digits}f} to {high:+.{digits}f}"
        per_fold = d["per_fold"]
        lines.append(_row([
            f"{name} - {reference}",
            *(f"{per_fold[i] * scale:+.{digits}f}" if i in per_fold else "-" for i in range(k)),
            _pm(d, scale, digits, sign="+"),
            interval,
            f"{d['n']}/{k}",
        ]))  # fmt: skip
    return "\n".join(lines)


def chosen_test_table(search_dir: str) -> str:
    """The chosen recipe's test folds; `search.read_test` refuses before the choice."""
    choice = search.read_choice(search_dir)
    tests = search.read_test(search_dir, choice["recipe"] if choice else None)
    s = search.chosen_test_scores(tests)
    each = lambda key, scale, digits: " / ".join(
        f"{t['cell'][key] * scale:.{digits}f}" for t in tests.values()
    )
    rows = [(f"cell {name}", key, scale, digits) for name, key, scale, digits in (
        ("accuracy %", "accuracy", 100, 2), ("AUC", "auc", 1, 4),
        ("sensitivity %", "sensitivity", 100, 2), ("specificity %", "specificity", 100, 2),
        ("F1", "f1", 1, 3))]  # fmt: skip
    lines = [
        f"Test folds of {choice['recipe']} (chosen {choice['date']}), mean +/- standard error "
        f"over {len(tests)} folds; cells at P >= 0.5.",
        "",
        "| test | mean +/- SE | per fold |",
        "|---|---|---|",
    ]
    for name, key, scale, digits in rows:
        lines.append(_row([name, _pm(s[key], scale, digits), each(key, scale, digits)]))
    for key in ("sensitivity", "specificity"):
        lines.append(_row([f"patient {key} %", _pm(s[f"patient_{key}"], 100, 1), ""]))
    errors = ", ".join(s["errors"]) or "no errors"
    lines.append(_row(["patients right", f"{s['patients_right']} of {s['patients']}", errors]))
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
