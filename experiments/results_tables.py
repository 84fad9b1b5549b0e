"""docs/results.md's generated tables, each written from committed records by one function.

`experiments.docs_tables` rewrites and checks them with the rest; GENERATORS maps a block name
to its function. The spread convention of results.md holds here too: mean +/- SD over folds
(sample SD), Wilson 95% intervals for proportions of patients, and a bootstrap over patients
for cell figures of one evaluation (the crops of one patient are not independent draws).
"""

from __future__ import annotations

import json
import pathlib
import re
import textwrap
from collections.abc import Callable

import numpy as np

from experiments.model_card_figures import BOOTSTRAP

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
SEARCH = RESULTS / "search"
ROUND2 = RESULTS / "search_round2"

# The targets, stated once (docs/results.md, "Targets"): the search protocol's, for the chosen
# recipe's mean over the five test folds, and the first goals, set for one split's test slides.
TARGETS = (  # figure, key, search target, first goal
    ("cell accuracy", "accuracy", 0.965, 0.970),
    ("cell ROC AUC", "auc", 0.993, 0.993),
    ("cell sensitivity", "sensitivity", 0.955, 0.965),
    ("cell specificity", "specificity", None, 0.965),
)
PATIENT_TARGET = 0.97  # share of patient decisions right; the first goal: "all right or explained"
# The second search's targets, for its chosen recipe's mean over the same five test folds.
ROUND2_TARGETS = (  # figure, key, target
    ("cell accuracy", "accuracy", 0.975),
    ("cell ROC AUC", "auc", 0.995),
    ("cell sensitivity", "sensitivity", 0.97),
    ("cell specificity", "specificity", 0.97),
)

# Each lever against the recorded runs it alone changes: (lever, without, with).
LEVERS = (
    ("training the baseline again", "default", "default_rerun"),
    ("gray-world normalisation", "default", "gray_world"),
    ("Mixup", "default", "mixup"),
    ("the two as an ensemble", "default", "ensemble_gray_world_mixup"),
    ("slide prior", "default", "default_slide_prior"),
    ("slide prior", "default_rerun", "default_rerun_slide_prior"),
    ("slide prior", "gray_world", "gray_world_slide_prior"),
    ("slide prior", "mixup", "mixup_slide_prior"),
    ("slide prior", "ensemble_gray_world_mixup", "ensemble_gray_world_mixup_slide_prior"),
    ("gray-world, under the slide prior", "default_rerun_slide_prior", "gray_world_slide_prior"),
    ("Mixup, under the slide prior", "default_rerun_slide_prior", "mixup_slide_prior"),
    ("the ensemble, under the slide prior", "default_rerun_slide_prior",
     "ensemble_gray_world_mixup_slide_prior"),
    ("Mixup joining gray-world", "gray_world_slide_prior",
     "ensemble_gray_world_mixup_slide_prior"),
    ("a third member (the baseline)", "ensemble_gray_world_mixup_slide_prior",
     "ensemble_default_rerun_gray_world_mixup_slide_prior"),
    ("last checkpoint", "gray_world", "gray_world_latest"),
    ("last checkpoint", "mixup", "mixup_latest"),
    ("last checkpoint", "ensemble_gray_world_mixup_slide_prior",
     "ensemble_gray_world_mixup_latest_slide_prior"),
)  # fmt: skip


def _wrap(text: str) -> str:
    """A paragraph at 100 columns, never broken inside a word ("2-core" stays whole)."""
    return textwrap.fill(text, 100, break_on_hyphens=False, break_long_words=False)


def _search(folder: pathlib.Path = SEARCH) -> tuple[dict, dict | None]:
    from experiments.search import records

    return records.read_search(str(folder)), records.read_choice(str(folder))


def baseline() -> dict:
    """The default config's flat form: what a recipe's changes are read against."""
    from experiments.configs import default
    from experiments.search import records

    return records.flatten(default.get_config().to_dict())


def search_validation() -> str:
    """What `python -m experiments.ablation --search=experiments/results/search` prints."""
    from experiments.search import tables

    found, choice = _search()
    return tables.validation_tables(found, baseline(), tables.changes, choice)


def search_paired() -> str:
    """`--paired=default` with `--metric=accuracy`, `auc` and `sensitivity`."""
    from experiments.search import tables

    found, _ = _search()
    return "\n\n".join(
        tables.paired_table(found, ["default"], metric)
        for metric in ("accuracy", "auc", "sensitivity")
    )


def search_levers() -> str:
    """Each lever against the same recorded runs without it, fold by fold."""
    from experiments.search import tables

    found, _ = _search()
    return tables.lever_table(found, list(LEVERS))


def search_test() -> str:
    """What `python -m experiments.ablation --search=experiments/results/search --test` prints."""
    from experiments.search import tables

    return tables.chosen_test_table(str(SEARCH))


def _shown(key: str, x: float, unit: bool = True) -> str:
    return f"{x:.4f}" if key == "auc" else f"{100 * x:.2f}" + ("%" if unit else "")


def _against(value: float, target: float) -> str:
    gap = 100 * (value - target)
    return "met" if gap >= 0 else f"missed by {-gap:.2f} points"


def search_targets() -> str:
    """The chosen recipe's test folds against both sets of targets."""
    from experiments.search import records

    choice = records.read_choice(str(SEARCH))
    s = records.chosen_test_scores(records.read_test(str(SEARCH), choice["recipe"]))
    lines = ["| test folds of the chosen recipe | mean +/- SD over 5 folds | target (search, "
             "2026-12-03) | | first goal (one split, 2026-11-26) | |",
             "|---|---:|---:|---|---:|---|"]  # fmt: skip
    for name, key, target, goal in TARGETS:
        mean, sd = s[key]["mean"], s[key]["sd"]
        lines.append(
            f"| {name} | {_shown(key, mean)} +/- {_shown(key, sd, unit=False)} | "
            + (f">= {_shown(key, target)} | {_against(mean, target)}" if target else "- | -")
            + f" | >= {_shown(key, goal)} | {_against(mean, goal)} |"
        )
    right, n = s["patients_right"], s["patients"]
    needed = int(np.ceil(PATIENT_TARGET * n))
    lines.append(
        f"| patient decisions right | {right} of {n}, {100 * right / n:.1f}% | "
        f">= {100 * PATIENT_TARGET:.0f}% | missed by {needed - right} patients "
        f"({needed} of {n} needed) | all right or explained | {n - right} wrong |"
        if right < needed
        else f"| patient decisions right | {right} of {n} | >= {100 * PATIENT_TARGET:.0f}% | "
        f"met | all right or explained | {n - right} wrong |"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The shipped model on its own split, from experiments/results/malaria_model/report.json.


def bootstrap_cells(slides: list[dict]) -> dict:
    """95% intervals of cell accuracy, sensitivity and specificity over the slides (patients),
    from report.json's per-slide counts: the model card's bootstrap, so both pages agree."""
    from experiments import model_card_figures

    return model_card_figures.count_bootstrap({"slides": slides})


def _cells(figures: dict, slides: list[dict] | None, key: str) -> str:
    value = f"{100 * figures[key]:.2f}%"
    if slides is None:
        return value
    low, high = bootstrap_cells(slides)[key]
    return f"{value} ({100 * low:.1f}-{100 * high:.1f})"


def shipped_split() -> str:
    """The shipped model on its split (seed 0), with and without the slide prior: a final run's
    16 validation slides, or an ensemble's members and its 16 validation and 16 test slides."""
    from experiments.search import tables

    with open(RESULTS / "malaria_model" / "report.json") as f:
        report = json.load(f)
    if not (report.get("data") or {}).get("num_test"):
        return _final_run_split(report)
    lines = ["| split seed 0, one run each | validation acc / AUC | test cell accuracy | "
             "test AUC | test sensitivity | test specificity | test patients right |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    names = {"shipped_gray_world": "member with gray-world normalisation",
             "shipped_mixup": "member with Mixup"}  # fmt: skip
    for member in report["members"]:
        t = member["test"]
        lines.append(f"| {names.get(member['run'], member['run'])} | - | "
                     f"{100 * t['accuracy']:.2f}% | {t['auc']:.4f} | - | - | - |")  # fmt: skip
    for key, name in (("without", "the ensemble, without the slide prior"),
                      ("with", "the ensemble with the slide prior (shipped)")):  # fmt: skip
        r = report["slide_prior"][key]
        v, t, p = r["validation"], r["test"], r["test_patient"]
        right = round(p["accuracy"] * p["n_patients"])
        lines.append(
            f"| {name} | {100 * v['accuracy']:.2f}% / {v['auc']:.4f} | "
            f"{_cells(t, p['slides'], 'accuracy')} | {t['auc']:.4f} | "
            f"{_cells(t, p['slides'], 'sensitivity')} | {_cells(t, p['slides'], 'specificity')} | "
            f"{tables.wilson_count(right, p['n_patients'])} |"
        )
    prov, training = report["provenance"], report["training"]
    members = {m["provenance"]["git"]["commit"][:7] for m in report["members"]}
    cpu = prov["cpu"]
    lines += ["", f"From `experiments/results/malaria_model/report.json`: members trained at "
              f"{', '.join(sorted(members))}, combined at {prov['git']['commit'][:7]}, on a "
              f"{cpu['logical_cores']}-core {cpu['model']} CPU (mnres "
              f"{prov['versions']['mnres']}, jax {prov['versions']['jax']}; "
              f"{training['wall_seconds_this_run'] / 60:.1f} min for the command). "
              f"{report['data']['num_train']:,} / {report['data']['num_validation']:,} / "
              f"{report['data']['num_test']:,} crops. Test cells: 95% bootstrap interval over "
              f"the 16 test patients ({BOOTSTRAP['resamples']:,} resamples, within infected and "
              f"within uninfected patients); patients: Wilson 95%. "
              "The record keeps the members' test accuracy and AUC only."]  # fmt: skip
    return "\n".join(lines[:-1] + [_wrap(lines[-1])])


def _final_run_split(report: dict) -> str:
    """A final run's validation slides (not held out: they chose its checkpoint and fitted its
    calibration and verdict rule), each figure with the card's bootstrap over those slides."""
    from mnres.weights import shipped

    card = shipped.shipped_card()
    intervals = (card["evaluation"].get("intervals") or {}).get("validation") or {}
    data = report["data"]
    lines = [f"| split seed 0: {data['num_validation']:,} crops of the validation slides, not "
             "held out | accuracy | AUC | sensitivity | specificity |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for key, scores, name in (("without", "plain", "without the slide prior"),
                              ("with", "prior", "with the slide prior (shipped)")):  # fmt: skip
        v, bounds = report["slide_prior"][key]["validation"], intervals.get(scores) or {}
        shown = []
        for k in ("accuracy", "auc", "sensitivity", "specificity"):
            value, b = _shown(k, v[k]), bounds.get(k)
            shown.append(value if not b else f"{value} ({_shown(k, b[0], False)}-"
                         f"{_shown(k, b[1], False)})")  # fmt: skip
        lines.append(f"| {name} | {' | '.join(shown)} |")
    prov, training = report["provenance"], report["training"]
    cpu = prov["cpu"]
    lines += ["", _wrap(
        f"From `experiments/results/malaria_model/report.json`: trained at "
        f"{report['members'][0]['provenance']['git']['commit'][:7]} and scored with the slide "
        f"prior at {prov['git']['commit'][:7]} on a {cpu['logical_cores']}-core {cpu['model']} "
        f"CPU (mnres {prov['versions']['mnres']}, jax {prov['versions']['jax']}; "
        f"{training['wall_seconds_this_run'] / 60:.1f} min for the commands). "
        f"{data['num_train']:,} training and {data['num_validation']:,} validation crops; no "
        "test split. Intervals: 95% bootstrap over the validation patients (the model card's)."
    )]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The cross-validation of default.py, from the crossval.md its command wrote.

CROSSVAL_ROWS = (  # crossval.md's metric, shown as, kind
    ("accuracy", "accuracy", "%"), ("sensitivity", "sensitivity", "%"),
    ("specificity", "specificity", "%"), ("f1", "F1", "3"), ("auc", "ROC AUC", "4"),
    ("mcc", "MCC", "3"),
    ("sensitivity at val. spec. 95%", "sensitivity at the validation threshold for 95% "
     "specificity", "%"),
    ("specificity reached (95%)", "specificity it reached", "%"),
    ("sensitivity at val. spec. 98%", "sensitivity at the validation threshold for 98% "
     "specificity", "%"),
    ("specificity reached (98%)", "specificity it reached", "%"),
    ("ECE before scaling", "ECE before temperature scaling", "4"),
    ("ECE after scaling", "ECE after temperature scaling", "4"),
)  # fmt: skip


def _mean_sd_cell(text: str, kind: str) -> str:
    mean, sd = (float(x) for x in text.split("±"))
    if kind == "%":
        return f"{100 * mean:.2f}% +/- {100 * sd:.2f}"
    return f"{mean:.{kind}f} +/- {sd:.{kind}f}"


def crossval_default() -> str:
    """By patient against by image, mean +/- SD over the 5 folds, and the pooled patients."""
    from experiments.search import tables

    path = RESULTS / "crossval_default" / "crossval.md"
    text = path.read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8:
            rows[cells[0]] = cells[6:]
    lines = ["| test folds, mean +/- SD over 5 folds | by patient (honest) | "
             "by image (patients leak) |", "|---|---:|---:|"]  # fmt: skip
    for key, name, kind in CROSSVAL_ROWS:
        patient, image = rows[key]
        lines.append(f"| {name} | {_mean_sd_cell(patient, kind)} | {_mean_sd_cell(image, kind)} |")
    found = re.search(r"\): (\d+) \((\d+) infected\); sensitivity (\d\.\d+), specificity (\d\.\d+)",
                      text)  # fmt: skip
    n, infected = int(found.group(1)), int(found.group(2))
    caught = round(float(found.group(3)) * infected)
    cleared = round(float(found.group(4)) * (n - infected))
    lines.append(
        f"| patients right, pooled over the test folds | "
        f"{tables.wilson_count(caught + cleared, n)}: infected {caught} of {infected}, "
        f"uninfected {cleared} of {n - infected} | |"
    )
    wall = re.search(r"Wall time .*?: (.*)\.", text)
    lines += ["", f"From `experiments/results/crossval_default/crossval.md`, the table "
              f"`python -m experiments.crossval` wrote (wall time {wall.group(1)})."]  # fmt: skip
    return "\n".join(lines[:-1] + [_wrap(lines[-1])])


def round2_validation() -> str:
    """`python -m experiments.ablation --search=experiments/results/search_round2`."""
    from experiments.search import tables

    found, choice = _search(ROUND2)
    return tables.validation_tables(found, baseline(), tables.changes, choice)


def round2_paired() -> str:
    """`--paired=gray_world` for the networks and `--paired=gray_world_slide_prior` for them with
    the slide prior (the choice's reading), each with `--metric=accuracy` and `auc`."""
    from experiments.search import tables

    found, _ = _search(ROUND2)
    blocks = []
    for reference in ("gray_world", "gray_world_slide_prior"):
        prior = reference.endswith("_slide_prior")
        others = [n for n in found if n != reference and n.endswith("_slide_prior") == prior]
        if others:
            blocks += [
                tables.paired_table(found, [reference, *others], metric)
                for metric in ("accuracy", "auc")
            ]
    return "\n\n".join(blocks)


def costs_table(folder: pathlib.Path = ROUND2) -> str:
    """`python -m experiments.recipe_cost`'s record in a search folder as a table."""
    record = json.loads((folder / "costs.json").read_text())
    lines = [
        "| recipe | input | alpha | epochs | parameters | multiply-adds per view | train step "
        "(ms, batch 64) | a fold, estimated (min) | int8 batch-1 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in record["recipes"].items():
        lines.append(
            f"| {name} | {c['image_size']} px | {c['alpha']} | {c['epochs']} | "
            f"{c['parameters']:,} | {c['multiply_adds'] / 1e6:.1f} M | {c['train_step_ms']:.0f} | "
            f"{c['fold_minutes']:.1f} | {c['int8_batch1_ms']:.2f} ({c['views']} views) |"
        )
    versions = record["versions"]
    lines += ["", _wrap(
        f"`{record['command']}` on a {record['cores']}-core {record['cpu']} CPU, quiet, "
        f"{record['recorded']} (Python {versions['python']}, jax {versions['jax']}). A fold's "
        "time is estimated from measured rates: its training steps at the median step time, "
        "each epoch's validation and the final evaluation (with the test-time views); the "
        "recorded folds' own wall times ran beside other work or on other CPUs."
    )]  # fmt: skip
    return "\n".join(lines)


def round2_test() -> str:
    """`python -m experiments.ablation --search=experiments/results/search_round2 --test`."""
    from experiments.search import tables

    return tables.chosen_test_table(str(ROUND2))


def round2_targets() -> str:
    """The second search's choice on its test folds against its targets, beside the first
    search's choice on the same folds (the same slides: a difference per fold)."""
    from experiments.search import records, tables

    tests = {}
    for folder in (ROUND2, SEARCH):
        choice = records.read_choice(str(folder))
        tests[folder] = (choice["recipe"], records.read_test(str(folder), choice["recipe"]))
    (new_name, new), (old_name, old) = tests[ROUND2], tests[SEARCH]
    s_new, s_old = records.chosen_test_scores(new), records.chosen_test_scores(old)
    lines = [f"| test folds, mean +/- SD over 5 folds | {new_name} | target | | {old_name} | "
             "difference, mean +/- SD (95% t) |", "|---|---:|---:|---|---:|---:|"]  # fmt: skip
    for name, key, target in ROUND2_TARGETS:
        d = records.mean_sd([new[k]["cell"][key] - old[k]["cell"][key] for k in sorted(new)])
        lines.append(
            f"| {name} | {_shown(key, s_new[key]['mean'])} +/- "
            f"{_shown(key, s_new[key]['sd'], unit=False)} | >= {_shown(key, target)} | "
            f"{_against(s_new[key]['mean'], target)} | {_shown(key, s_old[key]['mean'])} +/- "
            f"{_shown(key, s_old[key]['sd'], unit=False)} | {tables.paired_difference(d, key)} |"
        )
    lines.append(
        f"| patient decisions right (fraction rule) | "
        f"{tables.wilson_count(s_new['patients_right'], s_new['patients'])} | - | - | "
        f"{tables.wilson_count(s_old['patients_right'], s_old['patients'])} | - |"
    )
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[], str]] = {
    "search_validation": search_validation,
    "search_paired": search_paired,
    "search_levers": search_levers,
    "search_test": search_test,
    "search_targets": search_targets,
    "shipped_split": shipped_split,
    "crossval_default": crossval_default,
    "round2_validation": round2_validation,
    "round2_paired": round2_paired,
    "round2_costs": costs_table,
    "round2_test": round2_test,
    "round2_targets": round2_targets,
}
