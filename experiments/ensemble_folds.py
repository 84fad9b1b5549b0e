r"""Scores an ensemble of recorded recipes fold by fold, and records it as a recipe of the search.

  python -m experiments.ensemble_folds --data_dir=PATH/cell_images \
      --member=gray_world=runs/search/gray_world --member=mixup=runs/search/mixup \
      --record=experiments/results/search/ensemble_gray_world_mixup

Fold K's ensemble averages the log-odds of the members' fold-K runs (each trained on fold K's
training slides only, so no member has seen fold K's validation or test slides). A member is a
recipe recorded in the same search folder as --record, with the cross-validation workdir that
holds its recorded runs; a fold is scored once every member's run of it is the recorded one, and
the folds recorded already are skipped. Nothing is trained: it costs the members' inference on
each fold's validation split. --slide_prior replaces the training prevalence by each slide's
(`mnres.metrics.slide_prior`), and --checkpoint=latest scores the weights at the end of each
member's training in place of its best checkpoint; with either, one member is enough:

  python -m experiments.ensemble_folds --data_dir=PATH/cell_images --slide_prior \
      --member=gray_world=runs/search/gray_world \
      --record=experiments/results/search/gray_world_slide_prior

The tables then show it beside the trained recipes
(`python -m experiments.ablation --search=experiments/results/search`), its wall time the sum of
its members' training.
"""

import sys

from absl import app, flags, logging

import experiments
from experiments import _cli
from experiments.search import ensemble_folds, fold_summary

flags.DEFINE_multi_string(
    "member", None, "RECIPE=WORKDIR: a recorded recipe and its cross-validation workdir."
)
flags.DEFINE_string(
    "record", None, "The ensemble's folder in the search (experiments/results/search/NAME)."
)
flags.DEFINE_string("data_dir", None, "Where the cell images lie (PATH/cell_images).")
flags.DEFINE_string("cache_dir", None, "The decoded-image cache, if the members used one.")
flags.DEFINE_bool(
    "slide_prior", False, "Each slide's prevalence in place of the training split's (Bayes' rule)."
)
flags.DEFINE_enum(
    "checkpoint",
    "best",
    ["best", "latest"],
    "The members' checkpoint scored: the one each run evaluated (best per-epoch validation "
    "accuracy), or the weights at the end of training.",
)
flags.mark_flags_as_required(["member", "record"])
FLAGS = flags.FLAGS


def parse_members(specs: list[str], least: int) -> dict[str, str]:
    """{recipe: workdir} of the --member flags, at least `least` of them."""
    try:
        members = fold_summary.parse_members(specs)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if len(members) < least:
        raise app.UsageError(
            "an ensemble needs at least two --member (one with --slide_prior or "
            "--checkpoint=latest)"
        )
    return members


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    scoring = ensemble_folds.Scoring(FLAGS.slide_prior, FLAGS.checkpoint)
    members = parse_members(FLAGS.member, least=1 if scoring != ensemble_folds.Scoring() else 2)
    experiments.quiet_expected_info_logs()
    location = {"dir": FLAGS.data_dir, "cache_dir": FLAGS.cache_dir}
    try:
        done = ensemble_folds.record_ensemble(FLAGS.record, members, location, scoring)
    except (FileNotFoundError, ValueError) as e:
        if logging.vlog_is_on(1):
            raise
        sys.exit(f"error: {e}")
    logging.info("Recorded folds %s in %s.", done or "(none new)", FLAGS.record)


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
