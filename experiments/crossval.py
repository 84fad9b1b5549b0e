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
"""

import os
import sys

from absl import app, flags, logging

import experiments
from mnres import config_validation, host_memory
from mnres.evaluation import crossval

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
config_validation.define_config_flag(os.path.join(_CONFIGS, "default.py"))
flags.DEFINE_string("workdir", None, "Output folder; default: runs/crossval_<config file name>.")
flags.DEFINE_integer("num_folds", 5, "Number of folds (k).")
flags.DEFINE_list("folds", None, "Fold indices to run in this call (default: all).")
flags.DEFINE_bool("patient_level", True, "Run the folds split by slide (patient).")
flags.DEFINE_bool("image_level", True, "Also run the folds split by image, for comparison.")
FLAGS = flags.FLAGS


def _run(config, workdir: str, folds) -> None:
    """Validates `config` (before any work), then runs the folds."""
    config_validation.validate(config)
    experiments.quiet_expected_info_logs()
    if config.get("keep_freed_memory", True):
        host_memory.keep_freed_memory()  # before JAX starts its threads
    config_validation.validate_devices(config)
    crossval.run_crossval(
        config,
        workdir,
        num_folds=FLAGS.num_folds,
        folds=folds,
        patient_level=FLAGS.patient_level,
        compare_image_level=FLAGS.image_level,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = FLAGS.workdir or os.path.join("runs", f"crossval_{name}")
    folds = None if FLAGS.folds is None else [int(f) for f in FLAGS.folds]
    try:
        _run(FLAGS.config, workdir, folds)
    except (FloatingPointError, RuntimeError, ImportError, FileNotFoundError, ValueError) as e:
        if logging.vlog_is_on(1):  # -v 1 shows the traceback
            raise
        if isinstance(e, config_validation.ConfigError):  # a field that cannot work: exit 2
            config_validation.exit_with_error(e)
        sys.exit(f"error: {e}")
    logging.info("Summary: %s", os.path.join(os.path.abspath(workdir), crossval.CROSSVAL_MD))


if __name__ == "__main__":
    app.run(main, flags_parser=config_validation.parse_command_line)
