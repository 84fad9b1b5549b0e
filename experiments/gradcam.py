"""Grad-CAM grid of a trained run: correct and misclassified crops with heat-map overlays.

  python -m experiments.gradcam --workdir=runs/default
  python -m experiments.gradcam --workdir=runs/cv/fold_0 --layer=block_12 --num_examples=12

Writes WORKDIR/gradcam.png (or --out): the crops of the run's test split (its own fold for a
cross-validation fold), correct ones left and the most confident mistakes right, each beside
its Grad-CAM heat for "parasitized". Use it to check that the model looks at the parasite,
not at the background or the cell's edge. Correct and mistaken are called as the run was
evaluated (with its 8-view test-time augmentation when it used it); the heat is of one view.
"""

import os
import sys

from absl import app, flags, logging

import experiments
from experiments import _cli
from mnres import run_folder
from mnres.data import folds as folds_lib
from mnres.reporting import gradcam

flags.DEFINE_string("workdir", None, "A training run folder (config.json, checkpoints/).")
flags.DEFINE_string("out", None, "PNG to write; default WORKDIR/gradcam.png.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Which split's crops.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to explain.")
flags.DEFINE_string("layer", None, "Module whose output is explained (default: the deepest "
                    "feature map at least 7x7, e.g. block_5 of MobileNetV2 at 64 px).")  # fmt: skip
flags.DEFINE_integer("num_examples", 8, "Crops per side (correct, misclassified).")
flags.DEFINE_enum("normalize", "image", ["image", "shared"],
                  "'image': each heat map scaled to its own peak; 'shared': one scale for all, "
                  "so crops with little evidence stay dark.")  # fmt: skip
flags.DEFINE_integer("seed", 0, "Which correct examples are drawn.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    experiments.quiet_expected_info_logs()
    out = FLAGS.out or os.path.join(FLAGS.workdir, gradcam.GRADCAM_PNG)
    try:
        classifier = run_folder.load_run(FLAGS.workdir, which=FLAGS.checkpoint)
        ds = folds_lib.dataset_for_run(FLAGS.workdir, classifier.config)
        result = gradcam.explain_split(
            classifier,
            getattr(ds, FLAGS.split),
            out,
            num=FLAGS.num_examples,
            layer=FLAGS.layer,
            normalize=FLAGS.normalize,
            seed=FLAGS.seed,
        )
    except (RuntimeError, ImportError, FileNotFoundError, ValueError) as e:
        if logging.vlog_is_on(1):  # -v 1 shows the traceback
            raise
        sys.exit(f"error: {e}")
    logging.info(
        "Grad-CAM at layer %s: %d correct, %d misclassified crops -> %s",
        result["layer"], len(result["correct"]), len(result["misclassified"]), out,
    )  # fmt: skip


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
