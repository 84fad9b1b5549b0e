r"""The docs' generated tables: each written from committed records by one function.

  python -m experiments.docs_tables           # rewrite every generated block in docs/ and README
  python -m experiments.docs_tables --check   # exit 1, naming the blocks, when one differs

A generated block sits between two comment lines in a markdown file:

  <!-- generated: NAME (python -m experiments.docs_tables) -->
  ...the table...
  <!-- end generated: NAME -->

and NAME is a key of GENERATORS. A test runs the check, so a table typed by hand or left behind
by a changed record fails the suite.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections.abc import Callable

from experiments import results_tables

REPO = pathlib.Path(__file__).resolve().parent.parent
FILES = ("README.md", "docs/*.md", "experiments/results/*/README.md")


def _verdict_tables(results: str | None = None) -> Callable[[], str]:
    """The verdict protocol's tables of one records folder (default: the first search's)."""

    def tables() -> str:
        from experiments import verdict_tables

        return verdict_tables.table_markdown(results or verdict_tables.RESULTS)

    return tables


def _fold_outputs_table() -> str:
    """The retrained folds against the search's CPU records, from fold_outputs/summary.json."""
    import json

    with open(REPO / "experiments" / "results" / "fold_outputs" / "summary.json") as f:
        runs = [r for r in json.load(f)["runs"] if r.get("finished")]
    lines = ["| recipe | fold | val acc / AUC | search record val acc / AUC | best step (record) | "
             "test acc / AUC | wall s (record) | machine | names sha256 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        v, rec, t = r["validation"], r["recorded"]["validation"], r["test"]
        machine = r.get("machine") or {}
        where = ("NVIDIA H200, jax 0.11.2" if not machine else
                 f"{machine['logical_cores']}-core {machine['cpu']}, jax "
                 f"{machine['versions']['jax']}")  # fmt: skip
        recorded_step = (r["recorded"].get("evaluated") or {}).get("step", "-")
        lines.append(
            f"| {r['recipe']} | {r['fold']} | {v['accuracy']:.4f} / {v['auc']:.4f} | "
            f"{rec['accuracy']:.4f} / {rec['auc']:.4f} | {r['evaluated']['step']} "
            f"({recorded_step}) | {t['accuracy']:.4f} / {t['auc']:.4f} | "
            f"{r['wall_seconds']:.0f} ({r['recorded']['wall_seconds']:.0f}) | {where} | "
            f"{'match' if r['sha256_matches_record'] else 'DIFFER'} |"
        )
    return "\n".join(lines)


def _speed_record() -> tuple[dict, dict[str, bool]]:
    """experiments/results/predict_speed.json, and whether it timed the shipped weights and int8
    file ({"float": ..., "int8": ...}, by sha256): a rate of other weights is not quoted."""
    import json

    from mnres.provenance import file_sha256
    from mnres.weights import shipped

    with open(REPO / "experiments" / "results" / "predict_speed.json") as f:
        r = json.load(f)
    folder = shipped.shipped_folder()
    # The fields experiments.predict_speed writes, for the files it times.
    current = {key: r.get(f"{field}_sha256") == file_sha256(folder / name)
               for key, field, name in (("float", "weights", shipped.WEIGHTS),
                                        ("int8", "int8", shipped.INT8))}  # fmt: skip
    return r, current


def _predict_speed() -> str:
    """predict's speed against its model, from experiments/results/predict_speed.json."""
    r, current = _speed_record()
    if not all(current.values()):
        return ("Not measured for the shipped weights: `python -m experiments.predict_speed "
                "--data_dir=PATH/cell_images --out=experiments/results/predict_speed.json` "
                "timed other files.")  # fmt: skip
    machine = (f"{r['cores']}-core {r['cpu'].split(' x ', 1)[-1]} CPU, Python {r['python']}, "
               f"jax {r['jax']}, mnres {r['mnres']}, {r['date']}")  # fmt: skip
    return "\n".join([
        f"| `python -m experiments.predict_speed --crops={r['crops']}` ({r['data']}) | measured "
        "| target |",
        "|---|---:|---:|",
        f"| predict, shipped float model with 8-view TTA, crops/s | "
        f"{r['predict_float_crops_per_s']:.0f} | >= 100 |",
        f"| the same, against `jax.jit` of the model with the 8 views at batch 256 "
        f"({r['model_crops_per_s']:.0f} crops/s) | {r['predict_over_model']:.2f}x | >= 0.75x |",
        f"| `predict --sample`, second call, s | {r['sample_second_s']:.1f} | <= 8 |",
        f"| `predict --sample`, first call (empty compilation cache), s | "
        f"{r['sample_first_s']:.1f} | |",
        f"| predict, shipped int8 TFLite file, crops/s | {r['predict_int8_crops_per_s']:.0f} | |",
        f"| `--report` on top, s / page MB | {r['report_adds_s']:.1f} / {r['report_mb']:.1f} "
        "| <= 30 / 20 |",
        "",
        f"Timed from process start to the output written, PNGs on disk: {machine}.",
    ])  # fmt: skip


# The best published patient-level result, cited (not a record of this repository).
PUBLISHED = {"accuracy": "95.9% +/- 0.8", "auc": "0.991", "sensitivity": "94.7%",
             "specificity": "97.2%"}  # fmt: skip


def _patients(k: int, n: int) -> str:
    from mnres.metrics import intervals

    low, high = intervals.wilson_interval(k, n)
    return f"{k} of {n} ({100 * low:.0f}-{100 * high:.0f}%)"


def _headline() -> str:
    """The README's results table: the shipped model, its recipe's CV, the published best."""
    from experiments import (
        independent_evaluation,
        model_card_figures,
        package_model,
    )
    from experiments.search import records

    lines = ["| system | protocol | cell accuracy | ROC AUC | sensitivity | specificity | "
             "patients right |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    record = independent_evaluation.shipped()
    if record is None:
        lines.append("| shipped model | 40 unseen patients | not evaluated yet | | | | |")
    else:
        lines += _independent_rows(record, "shipped model")
    # The chosen recipe's sealed test folds through their one reader, summed up as the card does.
    source = package_model.origin()
    tests = records.read_test(source["search"], source["recipe"])
    cv = model_card_figures.cross_validation(tests, source["search_folder"])

    def sd(key, scale, digits):
        return f"{scale * cv[key]['mean']:.{digits}f} +/- {scale * cv[key]['sd']:.{digits}f}"

    verdicts = package_model.verdict_summary(source)
    pooled = verdicts["patients"]["accuracy"]
    # Patients by the verdict rule's cross-validation, when it is of the recipe's own networks.
    patients = _patients(pooled["k"], pooled["n"]) if verdicts["of_recipe"] else "-"
    lines.append(
        f"| its recipe, trained per fold | 5-fold patient CV of the 160 development slides, test "
        f"folds read once, slide prior | {sd('accuracy', 100, 2)}% | {sd('auc', 1, 4)} | "
        f"{sd('sensitivity', 100, 2)}% | {sd('specificity', 100, 2)}% | "
        f"{patients} |"
    )
    p = PUBLISHED
    lines.append(
        f"| best published (Rajaraman et al. 2018, ResNet-50 features) | 5-fold patient CV of "
        f"all 200 slides: another sample, not like for like | {p['accuracy']} | {p['auc']} | "
        f"{p['sensitivity']} | {p['specificity']} | |"
    )
    if record is not None:
        lines += ["", f"Independent evaluation: {_independent_source(record)}"]
    return "\n".join(lines)


def _independent_rows(record: dict, system: str) -> list[str]:
    """A maintainers' record as table rows, one per `mnres predict` call it reports."""
    return [f"| {system}, `{run['name'].replace('predict', 'mnres predict')}` | "
            f"{record['patients']['n']} unseen patients, {record['cells']['n']:,} crops, "
            f"evaluated once | {100 * run['accuracy']:.2f}% | {run['auc']:.4f} | "
            f"{100 * run['sensitivity']:.2f}% | {100 * run['specificity']:.2f}% | "
            f"{_patients(run['patients_right'], record['patients']['n'])} |"
            for run in record["runs"]]  # fmt: skip


def _independent_source(record: dict) -> str:
    return (f"`{record['command']}` on a {record['hardware']}, "
            f"mnres {record['versions']['mnres']}, jax {record['versions']['jax']}; its "
            f"patients are called by {record['patient_rule']}.")  # fmt: skip


def _independent_history() -> str:
    """The maintainers' evaluations of models that shipped before (their records)."""
    from experiments import independent_evaluation

    lines = []
    for record in independent_evaluation.earlier():
        lines += ["| system | protocol | cell accuracy | ROC AUC | sensitivity | specificity | "
                  "patients right |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += _independent_rows(record, f"shipped at {record['weights_commit']}")
        lines += [
            "",
            f"Reported {record['reported']} for the weights of sha256 "
            f"{record['weights_sha256'][:12]}...: {_independent_source(record)}",
            "",
        ]
    return "\n".join(lines).strip() or "No earlier model was evaluated."


def _shipped_files() -> str:
    """The shipped model's files: sizes (measured here) and batch-1 latency (predict_speed.json)."""
    from mnres.weights import shipped

    folder = shipped.shipped_folder()
    r, current = _speed_record()
    machine = f"{r['cores']}-core {r['cpu'].split(' x ', 1)[-1]} CPU, jax {r['jax']}"
    lines = ["| file | size | batch-1 latency (one crop) |", "|---|---:|---:|"]
    files = ((shipped.WEIGHTS, "float32 weights, JAX, 8-view TTA", "float"),
             (shipped.INT8, "int8 TFLite, 8-view TTA inside", "int8"))  # fmt: skip
    for name, what, key in files:
        ms = r.get(f"batch1_{key}_ms") if current[key] else None
        lines.append(f"| `{name}` ({what}) | {(folder / name).stat().st_size / 1e6:.2f} MB | "
                     + (f"{ms:.1f} ms" if ms else "not measured") + " |")  # fmt: skip
    lines += ["", f"Latency: median of 200 single crops, `python -m experiments.predict_speed` on "
              f"a {machine} (int8: LiteRT, one thread), {r['date']}."]  # fmt: skip
    return "\n".join(lines)


def _round2_fold_outputs_table() -> str:
    """The second search's folds whose per-crop outputs are recorded (fold_outputs/search_round2),
    each against the search's record of its fold (validation only: the test folds are read by
    the verdict protocol's test step)."""
    import json

    path = REPO / "experiments" / "results" / "fold_outputs" / "search_round2" / "summary.json"
    if not path.is_file():
        return "No fold recorded yet."
    lines = ["| recipe | fold | run | checkpoint step (search record) | val acc / AUC (search "
             "record) | CPU, jax |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in json.loads(path.read_text())["runs"]:
        rec = r.get("recorded")  # only a run trained again has its own figures beside these
        v = r.get("validation")
        figures = f"{v['accuracy']:.4f} / {v['auc']:.4f}" if v else "as recorded"
        if rec:
            figures += f" ({rec['validation']['accuracy']:.4f} / {rec['validation']['auc']:.4f})"
        step = f"{r['evaluated']['step']}" + (f" ({rec['evaluated']['step']})" if rec else "")
        machine = r.get("machine") or {}
        lines.append(
            f"| {r['recipe']} | {r['fold']} | {'trained again' if rec else 'recorded'} | {step} "
            f"| {figures} | {machine.get('cpu')}, jax "
            f"{(machine.get('versions') or {}).get('jax')} |"
        )
    return "\n".join(lines)


_DISTILLATION = REPO / "experiments" / "results" / "distillation"
_SINGLE = "gray_world_96_a075_e40_slide_prior"
_STUDENT = "distilled_gray_world_96_a075_e40_slide_prior"
# Fold K's teacher is the ensemble of the two runs that taught fold K's student: the first
# member's run folders were lost after fold 0, and folds 1-4 were trained again (its README).
_TEACHERS = {
    "ensemble_gray_world_96_a075_e40_gray_world_96_a075_e40_seed1_slide_prior": (0,),
    "ensemble_gray_world_96_a075_e40_rerun_gray_world_96_a075_e40_seed1_slide_prior": (1, 2, 3, 4),
}
_TEACHER = "teacher ensemble"


def teacher_ensemble(found: dict) -> dict:
    """{fold: record} of each fold's teacher ensemble, from the ensemble `_TEACHERS` names
    for that fold (a fold another ensemble also holds is not read from it)."""
    return {
        k: summary
        for name, folds in _TEACHERS.items()
        for k, summary in found.get(name, {}).items()
        if k in folds
    }


def _distillation_tables() -> str:
    """The distillation round's validation table and the paired differences its rule reads:
    each network against the teacher ensemble, and the teacher and the student against the
    single network that ships (all with the slide prior; the test folds stay sealed)."""
    from experiments.search import records, tables

    found = records.read_search(str(_DISTILLATION))
    blocks = [tables.validation_tables(found, results_tables.baseline(), tables.changes)]
    teacher = teacher_ensemble(found)
    paired = {**found, _TEACHER: teacher} if teacher else found
    members = [n for n in found if n.endswith("_slide_prior") and not n.startswith("ensemble_")]
    # The rule's single network last in its table, whatever a later recipe's name sorts to.
    for reference, others in (
        (_TEACHER, [n for n in members if n != _SINGLE] + [_SINGLE]),
        (_SINGLE, [_TEACHER, _STUDENT]),
    ):
        others = [n for n in others if n in paired]
        if reference in paired and others:
            blocks.append(tables.paired_table(paired, [reference, *others]))
    return "\n\n".join(blocks)


def _speed_benchmark() -> str:
    """The training-speed benchmark against its peers, from experiments/results/benchmark.json."""
    import json

    from experiments import benchmark_tables

    with open(REPO / "experiments" / "results" / "benchmark.json") as f:
        return benchmark_tables.markdown(json.load(f))


GENERATORS: dict[str, Callable[[], str]] = {
    "headline": _headline,
    "speed_benchmark": _speed_benchmark,
    "shipped_files": _shipped_files,
    "verdict_cv": _verdict_tables(),
    "verdict_cv_round2": _verdict_tables(
        str(REPO / "experiments" / "results" / "verdicts" / "search_round2")
    ),
    "fold_outputs": _fold_outputs_table,
    "round2_fold_outputs": _round2_fold_outputs_table,
    "distillation": _distillation_tables,
    "distillation_costs": lambda: results_tables.costs_table(_DISTILLATION),
    "predict_speed": _predict_speed,
    "independent_history": _independent_history,
}

GENERATORS.update(results_tables.GENERATORS)  # docs/results.md's tables

_BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) \(python -m experiments\.docs_tables\) -->\n)"
    r"(?P<body>.*?)"
    r"(<!-- end generated: (?P=name) -->)",
    re.S,
)


def _files() -> list[pathlib.Path]:
    return sorted({p for pattern in FILES for p in REPO.glob(pattern)})


def regenerate(text: str, path: str = "") -> tuple[str, list[str]]:
    """The text with every generated block rewritten, and the names of those that changed."""
    changed = []

    def replace(match):
        name = match.group("name")
        if name not in GENERATORS:
            raise ValueError(f"{path}: unknown generated block {name!r}")
        body = GENERATORS[name]().strip("\n") + "\n"
        if body != match.group("body"):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return _BLOCK.sub(replace, text), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a diff")
    args = parser.parse_args(argv)
    stale = []
    for path in _files():
        text = path.read_text()
        new, changed = regenerate(text, str(path))
        stale += [f"{path.relative_to(REPO)}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    if stale:
        print(("stale: " if args.check else "rewritten: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
