r"""Patient-level k-fold cross-validation of a config, with the image-level split beside it.

  python -m experiments.crossval --config=experiments/configs/default.py \
      --config.data.source=folder --config.data.dir=PATH/cell_images --workdir=runs/cv
  python -m experiments.crossval --config=experiments/configs/smoke.py --workdir=/tmp/cv

Each fold trains in WORKDIR/fold_K/ (and WORKDIR/image_level/fold_K/); finished folds are
skipped, so re-running the same command after an interruption continues with the next fold.
--folds=0,1 runs only those folds now; --nopatient_level runs the image-level folds only (for
TFDS malaria, which has no slide ids). The summary is WORKDIR/crossval.md (and .json), with
reliability diagrams before and after temperature scaling and the per-slide scatter plot.
The config is validated before any fold starts (as experiments.malaria does: one line, exit 2).

A recipe search (docs/results.md, "Choosing the recipe by patient cross-validation"):

  python -m experiments.crossval --config=experiments/configs/default.py \
      --config.data.source=folder --config.data.dir=PATH/cell_images \
      --workdir=runs/search/default --record=experiments/results/search/default

--record=SEARCH/RECIPE summarises each finished patient-level fold into that folder (its
validation figures and patient decisions, its sealed test figures; experiments.search.records),
to be committed. Folds recorded there are not run again, so the same command resumes in
another workdir or on another machine; with --record the image-level folds run only if
--image_level is given. --summarize_only records the finished folds of --workdir, training
nothing (e.g. folds run before --record was given).
"""

import os

from absl import app, flags, logging

import experiments
from experiments import _cli
from experiments.configs import default
from experiments.search import fold_summary
from experiments.search import records as search
from mnres import config as config_lib
from mnres import host_memory
from mnres.data import folds as folds_lib
from mnres.training import crossval

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
_cli.define_config_flag(os.path.join(_CONFIGS, "default.py"))
flags.DEFINE_string("workdir", None, "Output folder; default: runs/crossval_<config file name>.")
flags.DEFINE_integer("num_folds", 5, "Number of folds (k).")
flags.DEFINE_list("folds", None, "Fold indices to run in this call (default: all).")
flags.DEFINE_integer(
    "fold_seed",
    None,
    "The seed that cuts the folds (default: --config.seed). Keep it while changing "
    "--config.seed to train other weights on the same folds, e.g. per-fold ensemble members.",
)
flags.DEFINE_bool("patient_level", True, "Run the folds split by slide (patient).")
flags.DEFINE_bool("image_level", True, "Also run the folds split by image, for comparison.")
flags.DEFINE_string(
    "record",
    None,
    "Recipe search: record each finished patient-level fold in this folder "
    "(experiments/results/search/RECIPE, named after the recipe) and skip the folds recorded "
    "there; the image-level folds then run only if --image_level is given.",
)
flags.DEFINE_bool(
    "summarize_only",
    False,
    "With --record: record the finished folds of --workdir and train nothing. Each fold's own "
    "config.json is used; --config.data.dir and --config.data.cache_dir, when given, say where "
    "its data lie here.",
)
FLAGS = flags.FLAGS


def _record_finished(workdir: str, config) -> None:
    """Records the finished folds of `workdir` that the recipe's folder lacks."""
    location = {"dir": config.data.dir, "cache_dir": config.data.cache_dir}
    done = fold_summary.record_finished_folds(
        workdir, FLAGS.record, baseline=default.get_config().to_dict(), data_location=location
    )
    if done:
        logging.info("Recorded folds %s of %s in %s.", done, workdir, FLAGS.record)
    else:  # each fold of this call was recorded as it finished
        logging.info("No other finished fold of %s to record in %s.", workdir, FLAGS.record)


def _record_fold(fold_dir: str, dataset) -> None:
    """Records a fold that has just finished (its splits are still in memory)."""
    recipe = os.path.basename(os.path.normpath(FLAGS.record))
    summary, test = fold_summary.summarize_fold(
        fold_dir, recipe, baseline=default.get_config().to_dict(), dataset=dataset
    )
    search.record_fold(FLAGS.record, summary, test)
    logging.info("Recorded fold %d of %s in %s.", summary["fold"], recipe, FLAGS.record)


def _unrecorded(config, folds) -> list[int]:
    """The folds to run: those asked for that the recipe's folder does not hold yet."""
    spec = folds_lib.fold_spec(config, FLAGS.num_folds, "slide", FLAGS.fold_seed)
    search.check_same_recipe(FLAGS.record, search.recipe_config(config), spec)
    recorded = search.read_recipe(FLAGS.record)
    wanted = range(FLAGS.num_folds) if folds is None else folds
    if recorded:
        logging.info("Folds %s are recorded in %s; not running them.", list(recorded), FLAGS.record)
    return [k for k in wanted if k not in recorded]


def _run(config, workdir: str, folds) -> None:
    """Validates `config` (before any work), then runs the folds (and records them)."""
    config_lib.validate(config)
    experiments.quiet_expected_info_logs()
    if FLAGS.summarize_only:
        if not FLAGS.record:
            raise app.UsageError("--summarize_only needs --record=SEARCH/RECIPE")
        _record_finished(workdir, config)
        return
    if FLAGS.record:
        if not FLAGS.patient_level:
            raise app.UsageError("--record summarises patient-level folds: drop --nopatient_level")
        folds = _unrecorded(config, folds)
        if not folds:
            logging.info("Every fold asked for is recorded in %s.", FLAGS.record)
            return
    if config.keep_freed_memory:
        host_memory.keep_freed_memory()  # before JAX starts its threads
    config_lib.validate_devices(config)
    crossval.run_crossval(
        config,
        workdir,
        num_folds=FLAGS.num_folds,
        folds=folds,
        patient_level=FLAGS.patient_level,
        compare_image_level=FLAGS.image_level
        and (not FLAGS.record or FLAGS["image_level"].present),
        after_fold=_record_fold if FLAGS.record else None,
        fold_seed=FLAGS.fold_seed,
    )
    if FLAGS.record:  # folds that finished in an earlier call, before they could be recorded
        _record_finished(workdir, config)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = FLAGS.workdir or os.path.join("runs", f"crossval_{name}")
    folds = None if FLAGS.folds is None else [int(f) for f in FLAGS.folds]
    try:
        _run(FLAGS.config, workdir, folds)
    except _cli.FAILURES as e:
        if logging.vlog_is_on(1):  # -v 1 shows the traceback
            raise
        _cli.exit_with_failure(e)
    summary = os.path.join(os.path.abspath(workdir), crossval.CROSSVAL_MD)
    if not FLAGS.summarize_only and os.path.isfile(summary):  # none if every fold was recorded
        logging.info("Summary: %s", summary)


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
