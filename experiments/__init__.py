"""Experiments on mnres: `python -m experiments.malaria --config=experiments/configs/NAME.py`."""

import logging as std_logging

from absl import logging


class _ExpectedInfoFilter(std_logging.Filter):
    """Drops INFO lines that say nothing to act on; every warning and error stays."""

    def filter(self, record):
        if record.levelno >= std_logging.WARNING:
            return True
        if "/orbax/" in record.pathname:  # a dozen lines per checkpoint
            return False
        # JAX probes every backend it knows; on a machine without a TPU that probe fails, as
        # expected, and JAX says so at INFO level on every run.
        return not (
            record.pathname.endswith("xla_bridge.py")
            and record.getMessage().startswith("Unable to initialize backend")
        )


def quiet_expected_info_logs():
    """Drops orbax's per-checkpoint INFO lines and JAX's "no TPU here" probe line."""
    logging.get_absl_handler().addFilter(_ExpectedInfoFilter())
