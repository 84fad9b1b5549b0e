"""Experiments on mnres: `python -m experiments.malaria --config=experiments/configs/NAME.py`."""

import logging as std_logging

from absl import logging


class _OrbaxInfoFilter(std_logging.Filter):
    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_info_logs():
    """Drops orbax's INFO lines (a dozen per checkpoint); its warnings and errors stay."""
    logging.get_absl_handler().addFilter(_OrbaxInfoFilter())
