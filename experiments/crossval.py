"""Patient-level k-fold cross-validation of a config, with the image-level split beside it.

  python -m experiments.crossval --config=experiments/configs/default.py \
      --config.data.source=folder --config.data.dir=PATH/cell_images --workdir=runs/cv
  python -m experiments.crossval --config=experiments/configs/smoke.py --workdir=/tmp/cv

Each fold trains in WORKDIR/fold_K/ (and WORKDIR/image_level/fold_K/); finished folds are
skipped, so re-running the same command after an interruption continues with the next fold.
--folds=0,1 runs only those folds now; --nopatient_level runs the image-level folds only (for
TFDS malaria, which has no slide ids). The summary is WORKDIR/crossval.md (and .json), with
reliability diagrams before and after temperature scaling and the per-slide scatter plot.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import experiments
from mnres import host_memory
from mnres.evaluation import crossval

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
config_flags.DEFINE_config_file(
    "config", os.path.join(_CONFIGS, "default.py"), "Config file, FILE.py[:ARG].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output folder; default: runs/crossval_<config file name>.")
flags.DEFINE_integer("num_folds", 5, "Number of folds (k).")
flags.DEFINE_list("folds", None, "Fold indices to run in this call (default: all).")
flags.DEFINE_bool("patient_level", True, "Run the folds split by slide (patient).")
flags.DEFINE_bool("image_level", True, "Also run the folds split by image, for comparison.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    experiments.quiet_orbax_info_logs()
    if FLAGS.config.get("keep_freed_memory", True):
        host_memory.keep_freed_memory()  # before JAX starts its threads
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = FLAGS.workdir or os.path.join("runs", f"crossval_{name}")
    folds = None if FLAGS.folds is None else [int(f) for f in FLAGS.folds]
    try:
        crossval.run_crossval(
            FLAGS.config,
            workdir,
            num_folds=FLAGS.num_folds,
            folds=folds,
            patient_level=FLAGS.patient_level,
            compare_image_level=FLAGS.image_level,
        )
    except (FloatingPointError, RuntimeError, ImportError, FileNotFoundError, ValueError) as e:
        if logging.vlog_is_on(1):  # -v 1 shows the traceback
            raise
        sys.exit(f"error: {e}")
    logging.info("Summary: %s", os.path.join(os.path.abspath(workdir), crossval.CROSSVAL_MD))


if __name__ == "__main__":
    app.run(main)
