"""What each recipe of a search costs: parameters, multiply-adds, a fold's time, int8 latency.

  python -m experiments.recipe_cost                  # every recipe of the second round
  python -m experiments.recipe_cost --recipes=gray_world,gray_world_96 --out=FILE.json
  python -m experiments.recipe_cost --search=experiments/results/distillation \
      --recipes=gray_world_96_a075_e40,distilled_gray_world_96_a075_e40 \
      --out=experiments/results/distillation/costs.json

For each recipe folder that trained (its config: the first fold's record) the network is built
with random weights and measured on the CPU the command runs on, which should be quiet:

- parameters (with BatchNorm statistics, as Keras counts them) and multiply-adds of one view;
- a fold's wall time, estimated from measured rates: the training steps (the recipe's train
  step, batch and epochs; `STEPS_PER_EPOCH` for the development set's folds) at the median
  step time, each epoch's validation pass and the final evaluation (validation and test, with
  its test-time views) at the measured evaluation rate. Decoding the crops (~20 s) and the
  checkpoints are left out. The folds' own recorded wall times are not costs: they ran on
  other CPUs or beside other work. A distilled recipe's steps run its teacher's networks too:
  the recipes of the folders above its teacher runs (`RUNS/<recipe>/fold_{fold}`);
- the median batch-1 latency of its int8 TFLite export (one thread; its test-time views
  in the graph, as `mnres export` writes it). Weights do not change an int8 file's operations,
  so random ones time it as a trained one would.

The records (`experiments/results/search_round2/costs.json`, `.../distillation/costs.json`) are
written into docs/results.md and the distillation README by `python -m experiments.docs_tables`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from mnres import models, provenance, run_folder
from mnres.config import schema
from mnres.inference import Classifier
from mnres.models import params as params_lib
from mnres.training import bn_momentum, distill, optim, steps

SEARCH = os.path.join("experiments", "results", "search_round2")
OUT = os.path.join(SEARCH, "costs.json")
# The development set's 22,322 crops in 5 patient folds, 1/9 of each fold's training slides
# for validation: 15,827 to 15,904 training crops, 247 or 248 steps of 64; validation
# 1,980-2,060 and test ~4,460 crops per fold.
DEV_CELLS = 22322
STEPS_PER_EPOCH = 248
VALIDATION_CELLS = 2020
TEST_CELLS = 4465


def recipe_config(record: dict):
    """The recipe's full config from a fold record (paths and the momentum as the run had)."""
    return schema.from_overrides(record["config"])


def _network(config):
    """The recipe's model (its BatchNorm momentum resolved as its run resolves it)."""
    config, _, _ = bn_momentum.resolve(config, STEPS_PER_EPOCH * config.num_epochs)
    return models.from_config(config.model, platform=config.platform)


def _teacher(config, teacher_configs) -> distill.Teacher | None:
    """Random-weight networks of the teacher recipes, teaching as `config.distill` says."""
    if not teacher_configs:
        return None
    members = []
    for t in teacher_configs:
        model, size = _network(t), t.data.image_size
        variables = jax.jit(lambda m=model, s=size: m.init(
            jax.random.key(0), jax.numpy.zeros((1, s, s, 3)), train=False))()  # fmt: skip
        members.append(Classifier(model, dict(variables), size, config=t))
    names = tuple(f"teacher_{i}" for i in range(len(members)))
    return distill.Teacher(tuple(members), names, config.distill.weight, config.distill.temperature)


def _state_and_step(config, mesh, teacher_configs=()):
    model = _network(config)
    size = config.data.image_size
    shapes = params_lib.abstract_variables(model, (1, size, size, 3))
    tx, _ = optim.create_optimizer(
        config.optimizer, model, shapes["params"], STEPS_PER_EPOCH, config.num_epochs
    )
    state = steps.init_state(model, tx, size, config.seed, mesh, ema=config.ema_decay is not None)
    train_step = steps.make_train_step(
        model, tx, config.data, mesh, label_smoothing=config.label_smoothing,
        generalized_ce_q=config.generalized_ce_q, ema_decay=config.ema_decay,
        mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
        teacher=_teacher(config, teacher_configs),
    )  # fmt: skip
    return model, state, train_step


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config, *, teacher_configs=(), train_steps: int = 20, int8_calls: int = 100) -> dict:
    """The cost figures of one recipe's config, measured here; `teacher_configs`: the recipes
    of its distillation teacher's members, whose forward passes its train step runs."""
    size, batch = config.data.image_size, config.batch_size
    mesh = steps.make_mesh()
    model, state, train_step = _state_and_step(config, mesh, teacher_configs)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, batch).astype(np.int32)
    sharded = steps.shard_batch({"image": images, "label": labels}, mesh)
    holder = [state]

    def one_step():
        holder[0], metrics = train_step(holder[0], sharded)
        jax.block_until_ready(metrics)

    step_s = _median_seconds(one_step, train_steps)
    eval_batch = config.eval_batch_size
    eval_images = {
        "image": rng.integers(0, 256, (eval_batch, size, size, 3), dtype=np.uint8),
        "label": np.zeros(eval_batch, np.int32),
        "mask": np.ones(eval_batch, bool),
    }
    rates = {}
    for tta in (False, True):
        eval_step = steps.make_eval_step(model, mesh, tta=tta)
        batch_in = steps.shard_batch(eval_images, mesh)
        seconds = _median_seconds(
            lambda s=eval_step, b=batch_in: jax.block_until_ready(s(holder[0], b)), 3
        )
        rates[tta] = eval_batch / seconds
    views = 8 if config.test_time_augmentation else 1
    tta = bool(config.test_time_augmentation)
    train_s = step_s * STEPS_PER_EPOCH * config.num_epochs
    validate_s = config.num_epochs * VALIDATION_CELLS / rates[False]
    final_s = (VALIDATION_CELLS + TEST_CELLS) / rates[tta]
    counts = params_lib.count_params(model, (1, size, size, 3))
    return {
        "image_size": size,
        "alpha": config.model.alpha,
        "epochs": config.num_epochs,
        "views": views,
        "parameters": counts.total,
        "multiply_adds": params_lib.multiply_adds(model, (1, size, size, 3)),
        "train_step_ms": 1e3 * step_s,
        "eval_images_per_s": rates[False],
        "fold_minutes": (train_s + validate_s + final_s) / 60,
        "int8_batch1_ms": _int8_latency(model, holder[0], config, int8_calls),
    }


def _int8_latency(model, state, config, calls: int) -> float:
    """Median ms of one crop through the recipe's int8 TFLite export, one thread."""
    from mnres.deploy import export

    size = config.data.image_size
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    classifier = Classifier(model, variables, size, config=config).for_export()
    crops = np.random.default_rng(1).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = export.export_tflite(
            classifier, os.path.join(tmp, "int8.tflite"), quantize="int8",
            representative_images=crops,
        )  # fmt: skip
        interpreter = export.load_tflite(path, num_threads=1)
        return 1e3 * _median_seconds(lambda: interpreter.predict_one(crops[0]), calls)


def trained_recipes(found: dict) -> list[str]:
    """The recipes of a search that trained networks: not the per-fold ensembles and slide-prior
    scorings of `ensemble_folds`, which cost their members' training and inference."""
    return [name for name, folds in found.items() if "ensemble" not in folds[min(folds)]["config"]]


def teacher_recipes(config) -> list[str]:
    """The recipes of a distilled recipe's teacher: the folder above each teacher run
    (`RUNS/<recipe>/fold_{fold}`, as a search's cross-validation folders are laid out)."""
    if config.distill.teacher is None:
        return []
    return [
        os.path.basename(os.path.dirname(os.path.normpath(run.strip())))
        for run in config.distill.teacher.split(",")
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--search", default=SEARCH, help="the search folder")
    parser.add_argument("--recipes", default=None, help="comma-separated; default: every one")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--train_steps", type=int, default=20, help="timed train steps")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    from experiments.search import records

    found = records.read_search(args.search)
    names = args.recipes.split(",") if args.recipes else trained_recipes(found)
    costs = {}
    for name in names:
        config = recipe_config(found[name][min(found[name])])
        teachers = [recipe_config(found[t][min(found[t])]) for t in teacher_recipes(config)]
        costs[name] = measure(config, teacher_configs=teachers, train_steps=args.train_steps)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in costs[name].items()})
    out = {
        "command": " ".join(["python -m experiments.recipe_cost", *argv]),
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": provenance.cpu().get("model"),
        "cores": os.cpu_count(),
        "versions": provenance.versions(),
        "recipes": costs,
    }
    run_folder.write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
