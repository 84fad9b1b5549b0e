r"""Combines finished training runs of one slide split into an ensemble run: one model.

  python -m experiments.malaria --config=experiments/configs/default.py \
      --config.data.source=folder --config.data.dir=PATH/cell_images \
      --config.model.input_normalization=gray_world --workdir=runs/gray_world
  python -m experiments.malaria --config=experiments/configs/default.py \
      --config.data.source=folder --config.data.dir=PATH/cell_images \
      --config.mixup_alpha=0.2 --workdir=runs/mixup
  python -m experiments.ensemble_run --member=runs/gray_world --member=runs/mixup \
      --workdir=runs/ensemble

The ensemble run's model averages its members' logits (`mnres.models.Ensemble`); it is
evaluated on the members' validation and test slides and written as a run folder
(config.json, checkpoints/, report.json, calibration.json, ...), so `mnres predict`,
`mnres export` and `experiments.package_model` take it as one model. Nothing is trained. Its
figures read each slide with its own prevalence (`--slide_prior`, on by default: the recipe the
patient cross-validation chose, docs/results.md); the figures without it are in report.json
under `slide_prior`. One member alone gives that network itself, scored the same way: how a
single network of a `_slide_prior` recipe ships.
"""

from absl import app, flags, logging

import experiments
from experiments import _cli
from mnres import run_folder
from mnres.training import ensemble as ensemble_run

flags.DEFINE_multi_string(
    "member", None, "A finished training run (its workdir); one alone is scored with its prior."
)
flags.DEFINE_string("workdir", None, "The ensemble run's folder (new).")
flags.DEFINE_string("data_dir", None, "Where the members' cell images lie now (cell_images/).")
flags.DEFINE_bool(
    "slide_prior", True, "Report each slide's crops with its own prevalence (Bayes' rule)."
)
flags.mark_flags_as_required(["member", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    experiments.quiet_expected_info_logs()
    try:
        report = ensemble_run.combine(
            FLAGS.member, FLAGS.workdir, data_dir=FLAGS.data_dir, slide_prior=FLAGS.slide_prior
        )
    except _cli.FAILURES as e:
        if logging.vlog_is_on(1):
            raise
        _cli.exit_with_failure(e)
    split = "test" if run_folder.has_test_split(report) else "validation"
    cells, patients = report[split], report["test_patient"]
    said = (
        f"{FLAGS.workdir}: {split} accuracy {100 * cells['accuracy']:.2f}%, AUC "
        f"{cells['auc']:.4f}, sensitivity {100 * cells['sensitivity']:.2f}%, specificity "
        f"{100 * cells['specificity']:.2f}%"
    )
    if patients:
        right = round(patients["accuracy"] * patients["n_patients"])
        said += f"; patients {right} of {patients['n_patients']} right"
    said += " (slide prior)" if report["slide_prior"]["applied"] else ""
    if split == "validation":
        said += "; no test split: the validation slides chose the checkpoints, not held out"
    print(said)


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
