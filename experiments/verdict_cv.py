r"""Slide verdict rules compared by patient-level cross-validation of the shipped recipe.

The protocol below was committed before any test-fold output was read; `choose` reads only
validation rows, `test` reads the test rows once and refuses to run again over its record.

Data: the per-crop outputs of a shipped model's networks on its recipe search's five
patient-level folds (one npz per recipe and fold; by default the first search's two-network
ensemble, `experiments/results/fold_outputs`), combined as an ensemble combines its members:
the mean of their log-odds. P is sigmoid(log-odds), the uncalibrated P(parasitized) that
`mnres predict` shows. A patient is infected iff any of its crops is labelled parasitized.

Fixed before the comparison (not chosen):
- MIN_CELLS = 20: a slide of fewer crops is 'insufficient' (the slide prior's minimum too).
  Every development slide has 65 or more crops, so none is insufficient here.
- Scores: 'plain' (P as the model gives it) and 'prior' (the log-odds moved by the slide
  prior, `mnres.metrics.slide_prior`, with the fold's training-split prevalence).
- Candidates, each fitted on one fold's validation patients alone:
  (a) 'fraction': today's rule, infected iff the share of crops with P >= 0.5 exceeds a
      threshold (`choose_fraction_rule`: the widest interval of best validation balanced
      accuracy, its midpoint);
  (b) 'count': infected iff at least k crops have P >= q; k the smallest with no false alarm
      on the validation uninfected patients (`choose_count_rule`); q from QS;
  (c) 'binomial': the one-sided binomial test of the count of crops with P >= q against the
      false-positive rate measured on the crops of the validation uninfected patients, at
      ALPHA = 0.01; q from QS;
  (d) 'binomial_upper': as (c), tested against the upper end of that rate's Wilson 95%
      interval (the rate comes from four patients per fold; the bound guards against a low
      draw).
- q (rules b-d), per fold: the q in QS with the best validation balanced accuracy of
  patients; ties go to the q with the larger modelled detection of a light infection
  (`detection_probability` at LIGHT_FRACTION of parasitized crops, on a slide of the fold's
  median validation slide size), then to the larger q. A q at which the measured crop
  sensitivity does not exceed the false-positive rate (or its bound) makes no rule; skipped.
- Choosing the rule: every (candidate, scores) pair is scored by leave-one-patient-out within
  each fold's validation patients (the rule refitted without the patient, then applied to it),
  summed over the five folds (about 73 patients). The pair with the best balanced accuracy of
  those out-of-patient calls wins; ties go to the earlier pair in PREFERENCE (rules whose
  false-alarm rate is stated at any slide size first, plain before prior: a verdict that does
  not depend on a shift of the other crops' scores).
- The test read: each fold's rule for every pair is fitted on the fold's full validation
  patients and applied to its test patients; the 160 test patients are pooled. The chosen
  pair's figures are the result; the others are reported beside it and do not revise it.

  python -m experiments.verdict_cv choose   # validation only -> RESULTS/choice.json
  python -m experiments.verdict_cv test     # once -> RESULTS/test_folds.json
  python -m experiments.verdict_cv table    # docs/results.md's tables, from the records
  # the shipped model's rule: the pair chosen in the records origin.json names, fitted on the
  # shipped model's own validation slides
  python -m experiments.verdict_cv ship --data_dir=PATH/cell_images

Another model's recipes (their fold outputs from `python -m experiments.fold_outputs runs`) go
through the same protocol with their own records:

  python -m experiments.verdict_cv choose --recipes=A,B \
      --outputs=experiments/results/fold_outputs/search_round2 --results=RESULTS_2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from experiments.verdict_tables import RESULTS, shipped_origin, table_markdown
from mnres.metrics import intervals, slide_prior, verdict_fitting, verdicts

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = os.path.join(_REPO, "experiments", "results", "fold_outputs")
RECIPES = ("gray_world", "mixup")  # the first shipped ensemble's members
NUM_FOLDS = 5
MIN_CELLS = verdict_fitting.MIN_CELLS  # 20
QS = (0.5, 0.8, 0.9, 0.95, 0.99)
ALPHA = 0.01
LIGHT_FRACTION = 0.05
CANDIDATES = verdict_fitting.CANDIDATES  # binomial_upper, binomial, fraction, count
SCORES = ("plain", "prior")
PREFERENCE = tuple((c, s) for s in SCORES for c in CANDIDATES)


# ---------------------------------------------------------------------------------------------
# The fold outputs, one split at a time.


def load_fold(k: int, split: str, outputs: str = OUTPUTS, recipes=RECIPES) -> dict:
    """The ensemble's rows of fold k's `split`: name, slide_id, label, log_odds, prob.

    Only `split`'s rows of the outputs are kept (the columns are read whole from the npz,
    then cut: `choose` calls this with 'validation' and never holds a test output).
    """
    members = []
    for recipe in recipes:
        path = os.path.join(outputs, f"{recipe}_fold_{k}.npz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the member's fold outputs come first "
                                    "(python -m experiments.fold_outputs run)")  # fmt: skip
        with np.load(path) as d:
            rows = d["split"] == split
            members.append({c: d[c][rows] for c in ("name", "slide_id", "label", "log_odds")})
    first = members[0]
    for other in members[1:]:  # the same crops in the same order, or the mean is meaningless
        for c in ("name", "slide_id", "label"):
            if not np.array_equal(first[c], other[c]):
                raise ValueError(f"fold {k} {split}: the members' {c} columns differ")
    log_odds = np.mean([m["log_odds"].astype(np.float64) for m in members], axis=0)
    return dict(first, log_odds=log_odds)


def train_prevalence(k: int, outputs: str = OUTPUTS, recipes=RECIPES) -> float:
    """The parasitized share of fold k's training crops: every crop (the five test splits
    cover each once) less fold k's validation and test patients. Labels only."""
    labels, slides = [], []
    for j in range(NUM_FOLDS):
        with np.load(os.path.join(outputs, f"{recipes[0]}_fold_{j}.npz")) as d:
            rows = d["split"] == "test"
            labels.append(d["label"][rows])
            slides.append(d["slide_id"][rows])
            if j == k:
                held = set(d["slide_id"])  # fold k's validation and test patients
    labels, slides = np.concatenate(labels), np.concatenate(slides)
    train = ~np.isin(slides, sorted(held))
    return float(labels[train].mean())


def scores(rows: dict, which: str, prevalence: float) -> np.ndarray:
    """P(parasitized) of each crop, plain or with the slide prior."""
    log_odds = rows["log_odds"]
    if which == "prior":
        log_odds = slide_prior.adjust(log_odds, rows["slide_id"], prevalence)
    return 1.0 / (1.0 + np.exp(-log_odds))


# ---------------------------------------------------------------------------------------------
# Fitting a candidate on validation patients, and calling patients with it.


def calls(rule: verdicts.VerdictRule, probs, slide_ids) -> dict[str, bool]:
    """{slide: called infected} (every slide here has MIN_CELLS crops or more)."""
    return {r["slide_id"]: r["verdict"] == "infected"
            for r in verdicts.slide_verdicts(probs, slide_ids, rule)}  # fmt: skip


def infected_patients(labels, slide_ids) -> dict[str, bool]:
    return {s: bool(np.any(labels[slide_ids == s] == 1)) for s in np.unique(slide_ids)}


def fit(candidate: str, probs, labels, slide_ids) -> verdicts.VerdictRule:
    """The candidate's rule, from these (validation) crops alone (the protocol above)."""
    return verdict_fitting.fit_rule(candidate, probs, labels, slide_ids, MIN_CELLS, qs=QS,
                                    alpha=ALPHA, light_fraction=LIGHT_FRACTION)  # fmt: skip


def leave_one_patient_out(candidate: str, probs, labels, slide_ids) -> dict[str, bool]:
    """{slide: called infected} with each slide called by the rule fitted without it."""
    out = {}
    for slide in np.unique(slide_ids):
        rest = slide_ids != slide
        rule = fit(candidate, probs[rest], labels[rest], slide_ids[rest])
        out.update(calls(rule, probs[~rest], slide_ids[~rest]))
    return out


# ---------------------------------------------------------------------------------------------
# Figures of a set of patient calls.


def figures(truth: dict, called: dict) -> dict:
    """Patient sensitivity, specificity and accuracy, each with its Wilson 95% interval."""
    sick = [s for s in truth if truth[s]]
    healthy = [s for s in truth if not truth[s]]
    tp = sum(called[s] for s in sick)
    tn = sum(not called[s] for s in healthy)

    def share(k, n):
        low, high = intervals.wilson_interval(int(k), int(n))
        return {"k": int(k), "n": int(n), "value": k / n, "low": low, "high": high}

    return {
        "sensitivity": share(tp, len(sick)),
        "specificity": share(tn, len(healthy)),
        "accuracy": share(tp + tn, len(truth)),
        "balanced_accuracy": (tp / len(sick) + tn / len(healthy)) / 2.0,
        "missed": sorted(s for s in sick if not called[s]),
        "false_alarms": sorted(s for s in healthy if called[s]),
    }


def _write(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def _protocol(recipes) -> dict:
    return {"recipes": list(recipes), "min_cells": MIN_CELLS, "qs": list(QS), "alpha": ALPHA,
            "light_fraction": LIGHT_FRACTION, "candidates": list(CANDIDATES),
            "scores": list(SCORES)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The commands.


def choose(args) -> None:
    """Leave-one-patient-out on each fold's validation patients; the winner to choice.json."""
    pooled = {pair: ({}, {}) for pair in PREFERENCE}  # (truth, calls), slides keyed by fold
    for k in range(NUM_FOLDS):
        rows = load_fold(k, "validation", args.outputs, args.recipes)
        prevalence = train_prevalence(k, args.outputs, args.recipes)
        ids, labels = rows["slide_id"], rows["label"]
        truth = infected_patients(labels, ids)
        for candidate, which in PREFERENCE:
            probs = scores(rows, which, prevalence)
            called = leave_one_patient_out(candidate, probs, labels, ids)
            t, c = pooled[(candidate, which)]
            t.update({f"{k}/{s}": v for s, v in truth.items()})
            c.update({f"{k}/{s}": v for s, v in called.items()})
    table = []
    for candidate, which in PREFERENCE:
        f = figures(*pooled[(candidate, which)])
        table.append({"candidate": candidate, "scores": which, **f})
        print(f"{candidate:>15} {which:>5}: balanced {f['balanced_accuracy']:.4f}  sens "
              f"{f['sensitivity']['k']}/{f['sensitivity']['n']}  spec "
              f"{f['specificity']['k']}/{f['specificity']['n']}")  # fmt: skip
    best = max(range(len(table)), key=lambda i: (round(table[i]["balanced_accuracy"], 12), -i))
    chosen = {"candidate": table[best]["candidate"], "scores": table[best]["scores"]}
    print(f"chosen: {chosen}")
    _write(os.path.join(args.results, "choice.json"), {
        "protocol": _protocol(args.recipes), "chosen": chosen, "leave_one_patient_out": table,
        "read": "validation rows of every fold only",
    })  # fmt: skip


def measured_fpr(rule, probs, rows) -> float:
    """The share of the validation uninfected patients' crops with p >= the rule's q."""
    truth = infected_patients(rows["label"], rows["slide_id"])
    crop_infected = np.array([truth[s] for s in rows["slide_id"]])
    return verdict_fitting.false_positive_rate(probs, rows["label"], crop_infected, rule.q)[
        "false_positive_rate"]  # fmt: skip


def test(args) -> None:
    """Each fold's rules fitted on its validation patients, applied once to its test patients."""
    out_path = os.path.join(args.results, "test_folds.json")
    if os.path.exists(out_path):
        sys.exit(f"{out_path} exists: the test folds are read once (a new rule needs new data)")
    with open(os.path.join(args.results, "choice.json")) as f:
        choice = json.load(f)
    if choice["protocol"] != _protocol(args.recipes):
        sys.exit("choice.json was made under another protocol than this script's")
    per_pair = {f"{c}/{s}": {"folds": [], "truth": {}, "calls": {}} for c, s in PREFERENCE}
    fractions = {}
    for k in range(NUM_FOLDS):
        val = load_fold(k, "validation", args.outputs, args.recipes)
        tst = load_fold(k, "test", args.outputs, args.recipes)
        prevalence = train_prevalence(k, args.outputs, args.recipes)
        truth = infected_patients(tst["label"], tst["slide_id"])
        for s in truth:
            fractions[s] = float(np.mean(tst["label"][tst["slide_id"] == s]))
        for candidate, which in PREFERENCE:
            rule = fit(candidate, scores(val, which, prevalence), val["label"], val["slide_id"])
            called = calls(rule, scores(tst, which, prevalence), tst["slide_id"])
            entry = per_pair[f"{candidate}/{which}"]
            measured = measured_fpr(rule, scores(val, which, prevalence), val)
            entry["folds"].append({"fold": k, "rule": rule.to_dict(), "measured_fpr": measured,
                                   **figures(truth, called)})  # fmt: skip
            entry["truth"].update(truth)
            entry["calls"].update(called)
    record = {"protocol": _protocol(args.recipes), "chosen": choice["chosen"],
              "parasitized_fraction": fractions, "pairs": {}}  # fmt: skip
    for pair, entry in per_pair.items():
        record["pairs"][pair] = {"pooled": figures(entry["truth"], entry["calls"]),
                                 "folds": entry["folds"], "calls": entry["calls"]}  # fmt: skip
    _write(out_path, record)
    print(table_markdown(args.results))


SHIPPED_RECORD = os.path.join(_REPO, "experiments", "results", "malaria_model")
SHIPPED_OUTPUTS = os.path.join(SHIPPED_RECORD, "validation_outputs.npz")


def shipped_validation_outputs(data_dir: str) -> dict:
    """The shipped model's P(parasitized) on its own validation crops, as `predict` gives it.

    The crops are those of the shipped run's manifest (its validation slides in the folder
    source, the names' sha256 checked); kept in SHIPPED_OUTPUTS, which later calls read.
    """
    if os.path.isfile(SHIPPED_OUTPUTS):
        with np.load(SHIPPED_OUTPUTS) as d:
            return {k: d[k] for k in d.files}
    from mnres.data import folders
    from mnres.data.splits import names_sha256
    from mnres.deploy import predict
    from mnres.weights import loader

    with open(os.path.join(SHIPPED_RECORD, "manifest.json")) as f:
        split = json.load(f)["splits"]["validation"]
    listing = folders.list_folder(data_dir)
    keep = np.isin(listing["slide_ids"], split["slide_ids"])
    names = np.asarray(listing["names"])[keep]
    if names_sha256(names) != split["names_sha256"]:
        sys.exit(f"{data_dir}: the validation crops differ from the shipped run's (sha256)")
    predictor = predict.from_classifier(loader.load_pretrained("malaria").classifier, "malaria")
    paths = [p for p, k in zip(listing["paths"], keep, strict=True) if k]
    rows = predict.predict_files(predictor, paths, progress=True)
    out = {"name": names, "slide_id": listing["slide_ids"][keep],
           "label": listing["labels"][keep].astype(np.int32),
           "prob": np.array([r["prob_parasitized"] for r in rows], np.float32)}  # fmt: skip
    np.savez_compressed(SHIPPED_OUTPUTS, **out)
    return out


def ship(args) -> None:
    """The chosen pair fitted on the shipped model's validation slides, into its folder."""
    from mnres import run_folder
    from mnres.weights import shipped

    # Without --results, the records origin.json names: the first search's pair fitted on
    # another model's outputs would be a rule nobody chose for it.
    results = args.results or shipped_origin()["verdicts"]
    with open(os.path.join(results, "choice.json")) as f:
        chosen = json.load(f)["chosen"]
    out = shipped_validation_outputs(args.data_dir)
    card = shipped.shipped_card()
    record = verdict_fitting.rule_record(
        out["prob"], out["label"], out["slide_id"], candidate=chosen["candidate"],
        scores=chosen["scores"], train_prevalence=card["evaluation"]["train_prevalence"],
        min_cells=MIN_CELLS,
        fitted_on=f"the shipped model's validation split ({len(set(out['slide_id']))} slides), "
        "P as predict gives it"
        + (", moved by the slide prior" if chosen["scores"] == "prior" else ""),
    )  # fmt: skip
    path = shipped.shipped_folder() / run_folder.VERDICT_RULE_JSON
    run_folder.write_json(path, record)
    print(json.dumps(record, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("choose", "test", "table", "ship"))
    parser.add_argument("--data_dir", help="ship: PATH/cell_images, the development set")
    parser.add_argument("--outputs", default=OUTPUTS, help="the fold outputs' folder")
    parser.add_argument(
        "--results",
        help="where the records are written (default: the first search's; ship: the records "
        "experiments/results/malaria_model/origin.json names)",
    )
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help="the members whose mean log-odds are scored (their fold outputs)",
    )
    args = parser.parse_args(argv)
    args.recipes = tuple(args.recipes.split(","))
    if args.command != "ship":
        args.results = args.results or RESULTS
    if args.command == "table":
        print(table_markdown(args.results))
    else:
        {"choose": choose, "test": test, "ship": ship}[args.command](args)


if __name__ == "__main__":
    main()
