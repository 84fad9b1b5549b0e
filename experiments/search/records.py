"""Choosing a training recipe by patient-level cross-validation, the test folds sealed until then.

A recipe (a config) is run as the folds of `mnres.training.crossval`; each finished fold is
summarised into a search folder committed with the code, so a search resumes after an
interruption, later or on another machine::

  SEARCH/RECIPE/fold_K.json       fold K: validation figures, config, wall time, provenance
  SEARCH/RECIPE/fold_K_test.json  fold K's test figures: sealed, opened only by `read_test`
  SEARCH/choice.json              the chosen recipe and the validation table, written once

The per-fold score (`experiments.search.fold_summary`) is the final evaluation's validation
figures (report.json: cells called at P >= 0.5, with the run's test-time augmentation) and
patient decisions on the fold's validation slides. The decisions follow the rule applied to
test patients (infected iff the fraction of a slide's cells called parasitized exceeds a
threshold from `metrics.choose_fraction_threshold`), the threshold of each validation patient
chosen on the fold's other validation patients, so no decision has seen its own patient.

Recipes compare on the mean over folds with its sample standard deviation (SD, the spread of
the folds: the docs' one convention), and pairwise on per-fold differences
(`paired_differences`), whose mean also carries its standard error for a t interval. One recipe
is chosen (`choose`), only with every fold done; then, and only for it, the test figures can be
read (`read_test`).
"""

from __future__ import annotations

import datetime
import os
import re

import numpy as np

from mnres import config as config_lib
from mnres import run_folder
from mnres.provenance import file_sha256

CHOICE_JSON = "choice.json"
CELL_METRICS = ("accuracy", "auc", "sensitivity", "specificity")
_FOLD_FILE = re.compile(r"^fold_(\d+)\.json$")
# How a run is executed and where its data lie: the same recipe whatever their values (the
# schema's execution fields, `mnres.config.FIELD_KINDS`).
EXECUTION_FIELDS = config_lib.fields_of_kind(config_lib.EXECUTION)
# Fields that pick the data (recorded in each fold's spec), not the training recipe. The seed
# is the recipe's: it starts the weights and the batch order, and the folds unless a fold seed
# (in the spec) is given.
NOT_RECIPE = EXECUTION_FIELDS | {"data.source"}


_ABSENT = object()
_OFF = (None, False, "none")  # the values of a config field that is off


class SearchError(ValueError):
    """A record, choice or test read that the protocol refuses."""


def mean_sd(values) -> dict:
    """{mean, sd, se, n} of the values that are not None: sd the sample standard deviation,
    se = sd / sqrt(n); both None if n < 2. (choice.json's stored scores predate sd: se and mean
    are kept, so records written either way read alike.)"""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "sd": None, "se": None, "n": 0}
    sd = float(np.std(kept, ddof=1)) if len(kept) > 1 else None
    se = None if sd is None else sd / float(np.sqrt(len(kept)))
    return {"mean": float(np.mean(kept)), "sd": sd, "se": se, "n": len(kept)}


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a.b': value} of a nested dict; lists become tuples."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = tuple(value) if isinstance(value, list) else value
    return out


def changed_fields(config: dict, baseline: dict, ignored=NOT_RECIPE) -> dict:
    """{flat key: value} of every field of `config` that differs from `baseline`, sorted."""
    flat, base = flatten(config), flatten(baseline)
    return {
        key: flat[key]
        for key in sorted(flat)
        # A key the baseline lacks is a new option; one the config lacks predates it.
        if key not in ignored and flat[key] != base.get(key)
    }


def config_changes(config: dict, baseline: dict, ignored=NOT_RECIPE) -> str:
    """`key=value` for every field of `config` that differs from `baseline` (flat or nested)."""
    diff = changed_fields(config, baseline, ignored)
    return ", ".join(f"{key}={value}" for key, value in diff.items()) or "(baseline)"


def recipe_config(config, momentum_picked: bool = False) -> dict:
    """A run's config as its command gave it (`momentum_picked`: the BatchNorm momentum the
    training loop picked is unset again), machine paths reduced to 'PATH/<last part>'
    ('PATH/<recipe>/fold_{fold}' for a fold's folder), each of a comma-separated list alone."""
    config = run_folder.to_json_types(config)
    if momentum_picked:
        config["model"]["bn_momentum"] = None

    def scrub_path(path):
        if not (os.path.isabs(path) or path.startswith("~")):
            return path
        parent, name = os.path.split(os.path.normpath(path))
        # A cross-validation fold's folder ('.../RECIPE/fold_{fold}') is named by its recipe.
        return f"PATH/{os.path.basename(parent)}/{name}" if "{fold}" in name else f"PATH/{name}"

    def scrub(value):
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, str):  # a teacher may be a comma-separated list of folders
            return ",".join(scrub_path(part) for part in value.split(","))
        return value

    return scrub(config)


def run_recipe_config(report: dict) -> dict:
    """A run's config as its command gave it, from its report.json (`recipe_config`: the
    BatchNorm momentum the loop picked is unset again)."""
    return recipe_config(report["config"], (report.get("model") or {}).get("bn_momentum_picked"))


def _recipe_fields(summary: dict) -> dict:
    """The recipe fields of a record's config, a schema field it predates at its default (as a
    run's config.json reads, `mnres.config.from_overrides`)."""
    flat = flatten(run_folder.to_json_types(config_lib.from_overrides(summary["config"])))
    return {k: v for k, v in flat.items() if k not in EXECUTION_FIELDS}


# ---------------------------------------------------------------------------------------------
# The committed records.


def _fold_path(record_dir: str, fold: int, test: bool = False) -> str:
    return os.path.join(record_dir, f"fold_{fold}{'_test' if test else ''}.json")


def _write_new(path: str, obj) -> None:
    """Writes through a temporary file, so a file there is always whole."""
    run_folder.write_json(path + ".tmp", obj)
    os.replace(path + ".tmp", path)


def read_recipe(record_dir: str) -> dict[int, dict]:
    """{fold: validation summary} of a recipe's folder (no test figures); {} if none."""
    if not os.path.isdir(record_dir):
        return {}
    found = {}
    for name in os.listdir(record_dir):
        match = _FOLD_FILE.match(name)
        if match:
            found[int(match.group(1))] = run_folder.read_json(os.path.join(record_dir, name))
    return dict(sorted(found.items()))


def read_search(search_dir: str) -> dict[str, dict[int, dict]]:
    """{recipe: {fold: validation summary}} of every recipe folder of a search, by name."""
    if not os.path.isdir(search_dir):
        raise SearchError(f"no search folder {search_dir}")
    recipes = {}
    for name in sorted(os.listdir(search_dir)):
        folds = read_recipe(os.path.join(search_dir, name))
        if folds:
            recipes[name] = folds
    return recipes


def check_same_recipe(record_dir: str, config, spec: dict) -> None:
    """Raises SearchError unless `config` (a `recipe_config`) and the fold `spec` are those of
    the folds recorded in `record_dir`."""
    for k, other in read_recipe(record_dir).items():
        if {**other["spec"], "fold": 0} != {**spec, "fold": 0}:
            raise SearchError(f"fold {k} in {record_dir} has folds {other['spec']}, not {spec}")
        mine, theirs = _recipe_fields({"config": config}), _recipe_fields(other)
        differ = sorted(
            f
            for f in set(mine) | set(theirs)
            if mine.get(f, _ABSENT) != theirs.get(f, _ABSENT)
            # A field outside the schema (a model class's own) one side lacks: the same
            # recipe while the other side leaves it off.
            and not (f not in mine and theirs[f] in _OFF or f not in theirs and mine[f] in _OFF)
        )
        if differ:
            raise SearchError(
                f"fold {k} in {record_dir} is another recipe ({', '.join(differ[:5])} differ): "
                "record this config under another name"
            )


def record_fold(record_dir: str, summary: dict, test: dict) -> bool:
    """Writes fold_K_test.json, then fold_K.json (their presence: recorded); False if done.

    Raises:
      SearchError: `record_dir` holds another recipe, or this fold from another run.
    """
    check_same_recipe(record_dir, summary["config"], summary["spec"])
    k = summary["fold"]
    done = read_recipe(record_dir).get(k)
    if done is not None:
        if (done["evaluated"], done["validation"]["cell"]) == (
            summary["evaluated"], summary["validation"]["cell"]
        ):  # fmt: skip
            return False
        raise SearchError(
            f"fold {k} in {record_dir} is recorded from another run; delete "
            f"fold_{k}.json and fold_{k}_test.json there to replace it"
        )
    _write_new(_fold_path(record_dir, k, test=True), test)
    _write_new(_fold_path(record_dir, k), summary)
    return True


# ---------------------------------------------------------------------------------------------
# Scores of recipes, paired differences.


def recipe_scores(folds: dict[int, dict]) -> dict:
    """Mean and SD over a recipe's recorded folds of its validation figures."""
    summaries = list(folds.values())
    num_folds = summaries[0]["num_folds"]
    patients = [s["validation"]["patients"] for s in summaries]
    known = [p for p in patients if p]
    scores = {
        "folds": sorted(folds),
        "num_folds": num_folds,
        "complete": sorted(folds) == list(range(num_folds)),
        **{k: mean_sd([s["validation"]["cell"][k] for s in summaries]) for k in CELL_METRICS},
        "patient_auc": mean_sd([p["auc"] for p in known]),
        "patients_right": sum(p["right"] for p in known) if known else None,
        "patients": sum(p["n_patients"] for p in known) if known else None,
        "wall_seconds": mean_sd([s["wall_seconds"] for s in summaries]),
    }
    return scores


def _figure(summary: dict, metric: str):
    if metric == "patient_auc":
        return (summary["validation"]["patients"] or {}).get("auc")
    return summary["validation"]["cell"][metric]


def paired_differences(reference: dict, other: dict, metric: str = "accuracy") -> dict:
    """Per-fold `other - reference` of a validation figure over the folds both have.

    Returns:
      {per_fold: {fold: difference}, mean, sd, se, n}.

    Raises:
      SearchError: a common fold whose validation crops differ (other folds, not comparable).
    """
    common = sorted(set(reference) & set(other))
    for k in common:
        if reference[k]["validation_names_sha256"] != other[k]["validation_names_sha256"]:
            raise SearchError(
                f"fold {k} of {other[k]['recipe']} and {reference[k]['recipe']} validates on "
                "different crops: their folds differ (seed, fold count or data)"
            )
    pairs = {k: (_figure(reference[k], metric), _figure(other[k], metric)) for k in common}
    # A figure that is undefined on a fold (an AUC without one class) leaves that fold out.
    diffs = {k: b - a for k, (a, b) in pairs.items() if a is not None and b is not None}
    return {"per_fold": diffs, **mean_sd(diffs.values())}


def incomparable(search: dict[str, dict[int, dict]]) -> list[str]:
    """Recipes with a fold whose validation crops differ from the first recipe's same fold."""
    if not search:
        return []
    first = next(iter(search.values()))
    return [
        name
        for name, folds in search.items()
        if any(k in first and s["validation_names_sha256"] != first[k]["validation_names_sha256"]
               for k, s in folds.items())
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The choice, and the sealed test figures.


def read_choice(search_dir: str) -> dict | None:
    path = os.path.join(search_dir, CHOICE_JSON)
    return run_folder.read_json(path) if os.path.isfile(path) else None


def choose(search_dir: str, recipe: str, table: str) -> dict:
    """Writes choice.json once: the recipe, the validation `table` it is chosen on, the date
    and the sha256 of the recipe's record files (they must not change afterwards).

    Raises:
      SearchError: a recipe is already chosen, or `recipe` is unknown or lacks a fold.
    """
    previous = read_choice(search_dir)
    if previous is not None:
        raise SearchError(
            f"{previous['recipe']} was chosen on {previous['date']}; a search chooses once"
        )
    search = read_search(search_dir)
    if recipe not in search:
        raise SearchError(f"no recipe {recipe!r} in {search_dir}: {', '.join(search) or 'none'}")
    scores = recipe_scores(search[recipe])
    if not scores["complete"]:
        raise SearchError(
            f"{recipe} has {len(scores['folds'])} of {scores['num_folds']} folds "
            f"({scores['folds']}): a recipe is chosen on all of them"
        )
    record_dir = os.path.join(search_dir, recipe)
    files = [os.path.basename(_fold_path(record_dir, k, test)) for k in scores["folds"]
             for test in (False, True)]  # fmt: skip
    record = {
        "recipe": recipe,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "num_folds": scores["num_folds"],
        "table": table,
        "scores": {name: recipe_scores(folds) for name, folds in search.items()},
        "sha256": {name: file_sha256(os.path.join(record_dir, name)) for name in files},
    }
    try:  # 'x': a second choice fails even when two are made at once
        with open(os.path.join(search_dir, CHOICE_JSON), "x") as f:
            f.write(run_folder.json_text(record))
    except FileExistsError as e:
        raise SearchError("a recipe was chosen meanwhile; a search chooses once") from e
    return record


def read_test(search_dir: str, recipe: str) -> dict[int, dict]:
    """{fold: test summary} of the chosen recipe: the one reader of the stored test figures.

    Raises:
      SearchError: no recipe chosen yet, `recipe` is not the chosen one, or its records
        changed since the choice.
    """
    choice = read_choice(search_dir)
    if choice is None:
        raise SearchError(
            "no recipe is chosen yet: the test figures stay sealed until one is chosen on the "
            "validation folds"
        )
    if recipe != choice["recipe"]:
        raise SearchError(
            f"{choice['recipe']} was chosen, not {recipe}: only its test figures are read"
        )
    record_dir = os.path.join(search_dir, recipe)
    for name, digest in choice["sha256"].items():
        path = os.path.join(record_dir, name)
        if not os.path.isfile(path) or file_sha256(path) != digest:
            raise SearchError(f"{path} changed since the choice")
    return {
        k: run_folder.read_json(_fold_path(record_dir, k, test=True))
        for k in range(choice["num_folds"])
    }


def chosen_test_scores(tests: dict[int, dict]) -> dict:
    """Mean and SD over folds of the test figures `read_test` gives."""
    summaries = list(tests.values())
    patients = [t["patients"] for t in summaries if t.get("patients")]
    return {
        "folds": sorted(tests),
        **{k: mean_sd([t["cell"][k] for t in summaries]) for k in (*CELL_METRICS, "f1")},
        "patient_sensitivity": mean_sd([p["sensitivity"] for p in patients]),
        "patient_specificity": mean_sd([p["specificity"] for p in patients]),
        "patients_right": sum(round(p["accuracy"] * p["n_patients"]) for p in patients),
        "patients": sum(p["n_patients"] for p in patients),
        # Pooled over folds: each test patient is called once, so patients are counted, not
        # averaged over folds of 24-33 patients.
        **_pooled_patients(patients),
        "errors": [e for p in patients for e in p["errors"]],
    }


def _pooled_patients(patients: list[dict]) -> dict:
    """{infected, infected_right, uninfected, uninfected_right} over folds; {} if a fold's
    record lacks the class counts."""
    if not patients or any("n_infected" not in p for p in patients):
        return {}
    infected = [p["n_infected"] for p in patients]
    uninfected = [p["n_patients"] - n for p, n in zip(patients, infected, strict=True)]
    return {
        "infected": sum(infected),
        "infected_right": sum(
            round(p["sensitivity"] * n) for p, n in zip(patients, infected, strict=True)
        ),
        "uninfected": sum(uninfected),
        "uninfected_right": sum(
            round(p["specificity"] * n) for p, n in zip(patients, uninfected, strict=True)
        ),
    }
