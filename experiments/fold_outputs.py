r"""Per-crop outputs of the recipe search's cross-validation folds.

The recipe search (experiments/results/search) keeps each fold's figures, not its per-crop
outputs. Where the recorded runs' folders are kept, `runs` takes their outputs from them,
nothing trained (the validation rows recomputed from the checkpoint each run evaluated and
checked against its report.json, the test rows its own test_outputs.npz):

  python -m experiments.fold_outputs runs --data_dir=PATH/cell_images \
      --search=experiments/results/search_round2 \
      --member=gray_world=runs/search_round2/gray_world \
      --record=experiments/results/fold_outputs/search_round2

A fold trained again with its recorded command (its first run folder gone) may not give the
recorded weights on another CPU: `--retrained` records its own outputs then, marked as a retrain
in summary.json with its evaluation beside the recorded one.

Where they are gone, the other commands retrain recipes on the same patient-level folds as
`python -m experiments.crossval` (fold seed = config seed 0, 5 folds, folder source) and keep,
for every fold's validation and test crops, the file name, slide id, label and the log-odds of
parasitized that the run's final evaluation gave: the checkpoint `config.eval_checkpoint` names
('best': the best per-epoch validation accuracy) with `config.test_time_augmentation` (the 8
symmetries of each crop), as report.json and the search records' validation figures are made.

1. Pack the decoded crops of the folder source (the cross-validation pool, decoded by
   mnres.data's own code) into xz-compressed chunks that travel to another machine
   (`experiments.search.packed_pool`):

  python -m experiments.fold_outputs pack --data_dir=PATH/cell_images --pool=POOL

2. Train recipe x fold runs, several processes at once, and write one tar per recipe:

  python -m experiments.fold_outputs run --pool=POOL --workdir=runs/fold_outputs \
      --out=OUT --recipes=gray_world,mixup --folds=0,1,2,3,4 --parallel=10 \
      --records=experiments/results/search

Each tar holds, per fold K, fold_K.npz (split, name, slide_id, label, log_odds, prob, one row
per validation then test crop), fold_K.json (figures, wall seconds, evaluated checkpoint, the
validation names' sha256 against the recorded fold's) and the run's report.json,
metrics.jsonl and log. `--set FIELD=VALUE` adds config overrides to every run (for a quick
check: `--set num_epochs=1`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np

from experiments.search.packed_pool import FOLD_SEED, folder_config, load_pool, pack, unpack

# The recipes of the shipped ensemble (experiments/results/search/<name>/fold_K.json, field
# `changes`): overrides of experiments/configs/default.py.
RECIPES = {
    "gray_world": {"model.input_normalization": "gray_world"},
    "mixup": {"mixup_alpha": 0.2},
}
NUM_FOLDS = 5


# ---------------------------------------------------------------------------------------------
# One run: recipe x fold, as experiments.crossval trains it, its evaluation kept per crop.


def train_one(args) -> None:
    from experiments.search import records as search
    from mnres import config as config_lib
    from mnres import run_folder
    from mnres.data import folds as folds_lib
    from mnres.data.splits import names_sha256
    from mnres.training import crossval, final_evaluation

    overrides = dict(RECIPES[args.recipe], **args.overrides)
    pool, manifest, info = load_pool(args.pool, args.npy)
    config = folder_config(info["data_dir"], overrides)
    config_lib.validate(config)
    config_lib.validate_devices(config)
    spec = folds_lib.fold_spec(config, NUM_FOLDS, "slide", FOLD_SEED)
    record_dir = os.path.join(args.records, args.recipe) if args.records else None
    if record_dir and not args.overrides:  # the recorded recipe and folds (fold_K.json files only)
        search.check_same_recipe(record_dir, search.recipe_config(config.to_dict()), spec)
    folds = folds_lib.assign_folds(pool.labels, pool.slide_ids, NUM_FOLDS, spec["seed"], "slide")
    ds = folds_lib.fold_dataset(pool, folds, args.fold, spec, manifest)

    captured = {}
    evaluate_checkpoint = final_evaluation.evaluate_checkpoint

    def capture(run):  # the final evaluation's outputs, as the report is made from them
        captured["evaluation"] = evaluation = evaluate_checkpoint(run)
        return evaluation

    final_evaluation.evaluate_checkpoint = capture
    fold_dir = os.path.join(args.workdir, args.recipe, f"fold_{args.fold}")
    summary = crossval.run_fold(config, fold_dir, ds, spec, args.fold)
    evaluation = captured["evaluation"]
    report = run_folder.read_report(fold_dir)

    rows = {"split": [], "name": [], "slide_id": [], "label": [], "log_odds": [], "prob": []}
    for split_name, split, out in (
        ("validation", ds.validation, evaluation.validation),
        ("test", ds.test, evaluation.test),
    ):
        assert np.array_equal(out["labels"], split.labels)
        rows["split"] += [split_name] * len(split)
        rows["name"] += list(split.names)
        rows["slide_id"] += list(split.slide_ids)
        rows["label"] += list(split.labels)
        rows["log_odds"] += list(out["log_odds"])
        rows["prob"] += list(out["probs"])
    np.savez_compressed(
        os.path.join(fold_dir, "outputs.npz"),
        split=np.array(rows["split"]), name=np.array(rows["name"]),
        slide_id=np.array(rows["slide_id"]), label=np.array(rows["label"], np.int32),
        log_odds=np.array(rows["log_odds"], np.float32), prob=np.array(rows["prob"], np.float32),
    )  # fmt: skip

    val_sha = names_sha256(ds.validation.names)
    recorded = None
    if record_dir and os.path.isfile(os.path.join(record_dir, f"fold_{args.fold}.json")):
        recorded = run_folder.read_json(os.path.join(record_dir, f"fold_{args.fold}.json"))
    cell = lambda figures: {k: figures[k] for k in ("accuracy", "auc", "sensitivity",
                                                     "specificity", "n")}  # fmt: skip
    result = {
        "recipe": args.recipe,
        "fold": args.fold,
        "overrides": overrides,
        "spec": spec,
        "evaluated": {
            "checkpoint": evaluation.checkpoint,
            "step": evaluation.step,
            "test_time_augmentation": evaluation.tta,
        },
        "validation": cell(report["validation"]),
        "test": cell(report["test"]),
        "wall_seconds": summary["wall_time_s"],
        "validation_names_sha256": val_sha,
        "test_names_sha256": names_sha256(ds.test.names),
        "recorded_validation_names_sha256": recorded and recorded["validation_names_sha256"],
        "sha256_matches_record": (
            None if recorded is None else val_sha == recorded["validation_names_sha256"]
        ),
        "recorded_validation": recorded and recorded["validation"]["cell"],
        "recorded_wall_seconds": recorded and recorded["wall_seconds"],
        "provenance": report["provenance"],
        "warnings": summary["warnings"],
    }
    run_folder.write_json(os.path.join(fold_dir, "fold_outputs.json"), result)


# ---------------------------------------------------------------------------------------------
# Many runs at once, each recipe's finished folds bundled as soon as they finish.


def _bundle(out_dir: str, workdir: str, recipe: str, folds) -> None:
    """OUT/RECIPE.tar with each finished fold's outputs, report, metrics and log."""
    tmp = os.path.join(out_dir, f".{recipe}.tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        for k in sorted(folds):
            fold_dir = os.path.join(workdir, recipe, f"fold_{k}")
            for src, suffix in _BUNDLED:
                path = os.path.normpath(os.path.join(fold_dir, src.format(k=k)))
                if os.path.isfile(path):
                    tar.add(path, arcname=f"{recipe}/fold_{k}{suffix}")
    os.replace(tmp, os.path.join(out_dir, f"{recipe}.tar"))


_BUNDLED = (
    ("outputs.npz", ".npz"),
    ("fold_outputs.json", ".json"),
    ("report.json", "_report.json"),
    ("metrics.jsonl", "_metrics.jsonl"),
    ("../fold_{k}.log", ".log"),
)


def _log_path(workdir: str, recipe: str, k: int) -> str:
    return os.path.join(workdir, recipe, f"fold_{k}.log")


def _read(workdir: str, recipe: str, k: int, name: str) -> str:
    with open(os.path.join(workdir, recipe, f"fold_{k}", name)) as f:
        return f.read()


def _read_log(workdir: str, recipe: str, k: int) -> str:
    with open(_log_path(workdir, recipe, k)) as f:
        return f.read()


def run(args) -> None:
    started = time.perf_counter()
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    npy = os.path.join(args.workdir, "pool_images.npy")
    if not os.path.isfile(npy):
        unpack(args.pool, npy)
    print(f"[{time.perf_counter() - started:6.0f}s] pool unpacked and checked", flush=True)
    jobs = [(r, k) for r in args.recipes.split(",") for k in map(int, args.folds.split(","))]
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    pending, running, done = list(jobs), {}, {r: [] for r in RECIPES}
    failed = []
    while pending or running:
        while pending and len(running) < args.parallel:
            recipe, k = pending.pop(0)
            os.makedirs(os.path.join(args.workdir, recipe), exist_ok=True)
            cmd = [sys.executable, "-m", "experiments.fold_outputs", "train", f"--pool={args.pool}",
                   f"--npy={npy}", f"--workdir={args.workdir}", f"--recipe={recipe}",
                   f"--fold={k}", f"--records={args.records or ''}"]  # fmt: skip
            cmd += [f"--set={kv}" for kv in args.set or []]
            # beside the run folder: a run folder holds only what the run writes
            log = open(_log_path(args.workdir, recipe, k), "w")
            running[(recipe, k)] = (subprocess.Popen(cmd, stdout=log, stderr=log, env=env), log)
        time.sleep(5)
        for (recipe, k), (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[(recipe, k)]
            elapsed = time.perf_counter() - started
            if proc.returncode == 0:
                done[recipe].append(k)
                _bundle(args.out, args.workdir, recipe, done[recipe])
                r = json.loads(_read(args.workdir, recipe, k, "fold_outputs.json"))
                val = r["validation"]
                print(
                    f"[{elapsed:6.0f}s] {recipe} fold {k} done in {r['wall_seconds']:.0f}s: "
                    f"val acc {val['accuracy']:.4f} auc {val['auc']:.4f}, "
                    f"sha256 matches record: {r['sha256_matches_record']}",
                    flush=True,
                )
            else:
                failed.append((recipe, k))
                tail = _read_log(args.workdir, recipe, k)[-3000:]
                print(f"[{elapsed:6.0f}s] {recipe} fold {k} FAILED (exit {proc.returncode}):")
                print(tail, flush=True)
        if running and int(time.perf_counter() - started) % 60 < 5:
            for (recipe, k), _ in running.items():
                lines = _read_log(args.workdir, recipe, k).splitlines()
                epochs = [ln for ln in lines if "train loss" in ln]
                last = epochs[-1].split("]")[-1].strip()[:90] if epochs else "(starting)"
                print(f"[{time.perf_counter() - started:6.0f}s] {recipe} fold {k}: {last}",
                      flush=True)  # fmt: skip
    print(f"[{time.perf_counter() - started:6.0f}s] all done; failed: {failed or 'none'}",
          flush=True)  # fmt: skip
    if failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# The finished folds of a RECIPE.tar into the committed record.

RECORD = "experiments/results/fold_outputs"


def _recorded_evaluation(recipe: str, k: int) -> dict | None:
    path = os.path.join("experiments", "results", "search", recipe, f"fold_{k}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("evaluated")


def collect(tar_path: str, record: str = RECORD) -> list[int]:
    """Each finished fold of a RECIPE.tar as RECORD/RECIPE_fold_K.npz, and its entry in
    RECORD/summary.json (figures, checkpoint, wall seconds, per-epoch validation accuracy, the
    npz's sha256, the machine and versions of its run). Returns the folds collected."""
    summary_path = os.path.join(record, "summary.json")
    with open(summary_path) as f:
        summary = json.load(f)
    collected = []
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
        for name in sorted(n for n in names if n.endswith(".json") and "_" not in
                           os.path.basename(n).replace("fold_", "", 1)):  # fmt: skip
            recipe, base = name.split("/")
            k = int(base[len("fold_") : -len(".json")])
            result = json.load(tar.extractfile(name))
            data = tar.extractfile(f"{recipe}/fold_{k}.npz").read()
            out = f"{recipe}_fold_{k}.npz"
            with open(os.path.join(record, out), "wb") as f:
                f.write(data)
            metrics = tar.extractfile(f"{recipe}/fold_{k}_metrics.jsonl").read().decode()
            epochs = [json.loads(line) for line in metrics.splitlines() if line.strip()]
            prov = result.pop("provenance")
            entry = {
                "recipe": recipe, "fold": k, "finished": True, "file": out,
                "file_sha256": hashlib.sha256(data).hexdigest(),
                **{key: result[key] for key in (
                    "overrides", "evaluated", "validation", "test", "wall_seconds",
                    "validation_names_sha256", "recorded_validation_names_sha256",
                    "sha256_matches_record", "test_names_sha256", "warnings")},
                "recorded": {"validation": result["recorded_validation"],
                             "wall_seconds": result["recorded_wall_seconds"],
                             "evaluated": _recorded_evaluation(recipe, k)},
                "val_accuracy_per_epoch": [e["val_accuracy"] for e in epochs
                                           if "val_accuracy" in e],
                "machine": {"cpu": prov.get("cpu", {}).get("model"),
                            "logical_cores": prov.get("cpu", {}).get("logical_cores"),
                            "platform": prov.get("devices", {}).get("platform"),
                            "versions": prov.get("versions")},
            }  # fmt: skip
            summary["runs"] = [r for r in summary["runs"]
                               if (r["recipe"], r["fold"]) != (recipe, k)] + [entry]  # fmt: skip
            collected.append(k)
    summary["runs"].sort(key=lambda r: (r["recipe"], r["fold"]))
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)
        f.write("\n")
    return collected


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="decode the folder source and pack it")
    p.add_argument("--data_dir", required=True, help="PATH/cell_images")
    p.add_argument("--pool", required=True, help="output folder of the packed crops")
    for name in ("run", "train"):
        p = sub.add_parser(name)
        p.add_argument("--pool", required=True, help="the folder `pack` wrote")
        p.add_argument("--workdir", required=True, help="run folders (and the unpacked crops)")
        p.add_argument("--records", default="experiments/results/search",
                       help="the search folder: recipe and validation names are checked "
                       "against RECORDS/RECIPE/fold_K.json ('' for none)")  # fmt: skip
        p.add_argument("--set", action="append", help="FIELD=VALUE config override (all runs)")
    p = sub.choices["run"]
    p.add_argument("--out", required=True, help="where RECIPE.tar files are written")
    p.add_argument("--recipes", default="gray_world,mixup")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--parallel", type=int, default=10, help="training processes at once")
    p = sub.add_parser("collect", help="a RECIPE.tar's finished folds into the record")
    p.add_argument("tar", help="OUT/RECIPE.tar")
    p = sub.add_parser("runs", help="the recorded runs' own outputs, from their run folders")
    p.add_argument(
        "--member",
        action="append",
        required=True,
        help="RECIPE=WORKDIR: a recorded recipe and its cross-validation workdir",
    )
    p.add_argument("--search", required=True, help="the search folder that records them")
    p.add_argument("--record", required=True, help="where RECIPE_fold_K.npz files are written")
    p.add_argument("--data_dir", help="PATH/cell_images, where the crops lie here")
    p.add_argument(
        "--retrained",
        action="store_true",
        help="also take a finished run of a fold's recorded command that is not the recorded "
        "run (trained again elsewhere: its own outputs, marked so in summary.json)",
    )
    p = sub.choices["train"]
    p.add_argument("--npy", required=True)
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--fold", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command in ("run", "train"):  # a bad override fails here, not in every process
        try:
            if any("=" not in kv for kv in args.set or []):
                raise ValueError(f"--set takes FIELD=VALUE, got {args.set}")
            args.overrides = dict(kv.split("=", 1) for kv in args.set or [])
            folder_config("", args.overrides)
        except ValueError as e:
            parser.error(str(e))
    if args.command == "pack":
        pack(args.data_dir, args.pool)
    elif args.command == "run":
        run(args)
    elif args.command == "collect":
        print("collected folds:", collect(args.tar))
    elif args.command == "runs":
        from experiments.search import fold_summary

        try:
            members = fold_summary.parse_members(args.member)
        except ValueError as e:
            parser.error(str(e))
        try:
            written = fold_summary.record_crop_outputs(
                args.search, members, args.record, {"dir": args.data_dir}, args.retrained
            )
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        print("written:", ", ".join(f"{r} fold {k}" for r, k in written) or "nothing new")
    else:
        from absl import logging

        import experiments

        logging.use_absl_handler()
        logging.set_verbosity(logging.INFO)
        experiments.quiet_expected_info_logs()
        train_one(args)


if __name__ == "__main__":
    main()
