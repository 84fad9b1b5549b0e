"""A recipe search's tables, printed from its recorded folds (`records`), never typed in.

`python -m experiments.ablation --search=...` prints them, and `experiments.results_tables`
writes the same text into docs/results.md. One convention for spread: the mean +/- SD over
folds (sample standard deviation); patients are counted, with a Wilson 95% interval.
"""

from __future__ import annotations

import scipy.stats

from experiments.search import records as search
from mnres.metrics import intervals

# Where the data lives, how the run is executed and how it is shown say nothing about the
# recipe; test-time augmentation has a column of its own.
IGNORED = search.NOT_RECIPE | {"test_time_augmentation"}


def changes(config: dict, baseline: dict) -> str:
    """`key=value` for every recipe field of `config` that differs from `baseline`."""
    return search.config_changes(config, baseline, IGNORED)


_SEARCH_COLUMNS = (  # header, validation figure, scale, digits
    ("val acc %", "accuracy", 100, 2),
    ("val AUC", "auc", 1, 4),
    ("val sens %", "sensitivity", 100, 2),
    ("val spec %", "specificity", 100, 2),
)
_SCALES = {"accuracy": (100, 2), "sensitivity": (100, 2), "specificity": (100, 2),
           "auc": (1, 4), "patient_auc": (1, 3)}  # fmt: skip


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _pm(entry, scale=1.0, digits=2, sign="") -> str:
    """'mean +/- SD' (sample SD over folds); the mean alone for one value, '-' for none."""
    if entry["mean"] is None:
        return "-"
    mean = f"{entry['mean'] * scale:{sign}.{digits}f}"
    return mean if entry["sd"] is None else f"{mean} +/- {entry['sd'] * scale:.{digits}f}"


def wilson_count(right: int, n: int) -> str:
    """'k of n (low-high%)': the Wilson 95% interval, the docs' convention for patients."""
    low, high = intervals.wilson_interval(right, n)
    return f"{right} of {n} ({100 * low:.0f}-{100 * high:.0f}%)"


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
    """A search's validation table (mean +/- SD over folds) and its per-fold accuracies.

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
        "Validation slides of each fold; mean +/- SD over folds (sample standard deviation). "
        "Patients: each called with the fraction threshold chosen on the fold's other "
        "validation patients.",
        "",
        _row(header),
        "|" + "---|" * len(header),
    ]
    for name in order:
        s, first = scores[name], next(iter(found[name].values()))
        right = "-" if s["patients"] is None else wilson_count(s["patients_right"], s["patients"])
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
              "mean +/- SD", "95% interval of the mean (t)", "folds"]  # fmt: skip
    lines = [_row(header), "|" + "---|" * len(header)]
    for name in others:
        d = search.paired_differences(found[reference], found[name], metric)
        per_fold = d["per_fold"]
        lines.append(_row([
            f"{name} - {reference}",
            *(f"{per_fold[i] * scale:+.{digits}f}" if i in per_fold else "-" for i in range(k)),
            _pm(d, scale, digits, sign="+"),
            _t_interval(d, scale, digits),
            f"{d['n']}/{k}",
        ]))  # fmt: skip
    return "\n".join(lines)


def paired_difference(d: dict, metric: str) -> str:
    """'mean +/- SD (low to high)' of a paired difference (`records.mean_sd` of the per-fold
    differences), in the metric's points or units, with its 95% t interval."""
    scale, digits = _SCALES[metric]
    return f"{_pm(d, scale, digits, sign='+')} ({_t_interval(d, scale, digits)})"


def _t_interval(d: dict, scale: float, digits: int) -> str:
    """The 95% t interval of a mean paired difference (mean +/- t * SD / sqrt(n))."""
    if d["se"] is None:
        return "-"
    half = scipy.stats.t.ppf(0.975, d["n"] - 1) * d["se"] * scale
    low, high = d["mean"] * scale - half, d["mean"] * scale + half
    return f"{low:+.{digits}f} to {high:+.{digits}f}"


def lever_table(found: dict, levers: list[tuple[str, str, str]]) -> str:
    """One row per lever: a recipe against the recorded runs it differs from by that lever
    alone (`(label, without, with)`), paired fold by fold on the folds both have."""
    header = ["lever", "with - without", "folds", "val acc (points)", "95% interval (t)",
              "folds up / down", "val AUC", "val sens (points)", "val spec (points)",
              "val patients right, without -> with"]  # fmt: skip
    lines = [_row(header), "|" + "---|" * len(header)]
    for label, without, with_ in levers:
        d = {m: search.paired_differences(found[without], found[with_], m)
             for m in ("accuracy", "auc", "sensitivity", "specificity")}  # fmt: skip
        folds = sorted(d["accuracy"]["per_fold"])
        steps = d["accuracy"]["per_fold"].values()
        right = {
            name: sum(found[name][k]["validation"]["patients"]["right"] for k in folds)
            for name in (without, with_)
        }
        lines.append(_row([
            label, f"{with_} - {without}", f"{len(folds)}/{found[without][folds[0]]['num_folds']}",
            _pm(d["accuracy"], 100, 2, sign="+"), _t_interval(d["accuracy"], 100, 2),
            f"{sum(v > 0 for v in steps)} / {sum(v < 0 for v in steps)}",
            _pm(d["auc"], 1, 4, sign="+"), _pm(d["sensitivity"], 100, 2, sign="+"),
            _pm(d["specificity"], 100, 2, sign="+"), f"{right[without]} -> {right[with_]}",
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
        f"Test folds of {choice['recipe']} (chosen {choice['date']}), mean +/- SD over "
        f"{len(tests)} folds; cells at P >= 0.5; patients pooled, Wilson 95% interval.",
        "",
        "| test | mean +/- SD | per fold |",
        "|---|---|---|",
    ]
    for name, key, scale, digits in rows:
        lines.append(_row([name, _pm(s[key], scale, digits), each(key, scale, digits)]))
    for key, group in (("sensitivity", "infected"), ("specificity", "uninfected")):
        if group in s:  # pooled counts; older records without them: the mean over folds
            folds = [search.chosen_test_scores({0: t}) for t in tests.values()]
            each_fold = " / ".join(f"{f[group + '_right']} of {f[group]}" for f in folds)
            lines.append(_row([f"patient {key}", wilson_count(s[f"{group}_right"], s[group]),
                               each_fold]))  # fmt: skip
        else:
            lines.append(_row([f"patient {key} %", _pm(s[f"patient_{key}"], 100, 1), ""]))
    per_fold = [t["patients"] for t in tests.values() if t.get("patients")]
    lines.append(_row([
        "patients right", wilson_count(s["patients_right"], s["patients"]),
        " / ".join(f"{round(p['accuracy'] * p['n_patients'])} of {p['n_patients']}"
                   for p in per_fold),
    ]))  # fmt: skip
    lines.append(_row(["patients called wrong", len(s["errors"]),
                       ", ".join(s["errors"]) or "no errors"]))  # fmt: skip
    return "\n".join(lines)
