r"""Trains and evaluates a malaria cell classifier; writes everything to the workdir.

  python -m experiments.malaria                                  # default.py, TFDS `malaria`
  python -m experiments.malaria --config=experiments/configs/smoke.py --workdir=/tmp/smoke
  python -m experiments.malaria --config=experiments/configs/default.py \
      --config.data.source=folder --config.data.dir=PATH/cell_images --workdir=runs/folder
  python -m experiments.malaria --config=experiments/configs/finetune.py \
      --config.data.source=folder --config.data.dir=PATH --workdir=runs/mine  # any classes

Any config field can be overridden with `--config.FIELD=VALUE`. The whole config is validated
before any work: a field that cannot work (an unknown key, a wrong type, a value out of range)
ends the command with one line, `error: ...`, and exit code 2. Re-running with the same workdir
resumes from its latest checkpoint.
"""

import os

from absl import app, flags, logging

import experiments
from experiments import _cli
from mnres import config as config_lib
from mnres import host_memory, run_folder
from mnres.training import distributed
from mnres.training import loop as train

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
_cli.define_config_flag(os.path.join(_CONFIGS, "default.py"))
flags.DEFINE_string("workdir", None, "Output folder; default: runs/<config file name>.")
FLAGS = flags.FLAGS

# Tests only: exit hard (like SIGKILL, no clean-up) right after this training step.
_KILL_AT_STEP = "MNRES_TEST_KILL_AT_STEP"


def _kill_hook():
    kill_at = os.environ.get(_KILL_AT_STEP)
    if not kill_at:
        return None

    def after_step(step: int) -> None:
        if step == int(kill_at):
            logging.flush()
            os._exit(137)

    return after_step


def _train(config, name: str, workdir: str) -> dict:
    """Validates `config` (before any work), then trains and evaluates it."""
    config_lib.validate(config)
    experiments.quiet_expected_info_logs()
    if config.keep_freed_memory:
        host_memory.keep_freed_memory()  # before JAX starts its threads
    distributed.initialize_distributed(config)  # before anything touches a device
    config_lib.validate_devices(config)
    logging.info("Config %s, workdir %s", name, os.path.abspath(workdir))
    # The training split's size is checked once it is loaded, before the first step.
    return train.train_and_evaluate(config, workdir, after_step=_kill_hook(), validated=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    # experiments/configs/paper.py:keras_bn -> paper_keras_bn
    path, _, arg = flags.FLAGS["config"].config_filename.partition(":")
    name = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg else "")
    workdir = FLAGS.workdir or os.path.join("runs", name)
    try:
        report = _train(config, name, workdir)
    except _cli.FAILURES as e:
        if logging.vlog_is_on(1):  # -v 1 shows the traceback
            raise
        _cli.exit_with_failure(e)
    distributed.shutdown_distributed(config)
    report_md = os.path.join(os.path.abspath(workdir), "report.md")
    split = "test" if run_folder.has_test_split(report) else "validation"
    cells, patients = report[split], report["test_patient"]
    auc = cells["auc"]
    logging.info(
        "%s: cell accuracy %.4f, AUC %s%s. Report: %s",
        split.capitalize() if split == "test" else "No test split; validation (not held out)",
        cells["accuracy"],
        "n/a" if auc is None else f"{auc:.4f}",
        f", patient accuracy {patients['accuracy']:.4f} ({patients['n_patients']} patients)"
        if patients
        else "",
        report_md,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
