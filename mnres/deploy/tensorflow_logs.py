"""TensorFlow and the TFLite converter without their INFO and WARNING lines; errors still show.

An export to TFLite would otherwise write some ten lines to stderr (TF 2.21) that say nothing
to its user: TensorFlow's import notes (absl's "InitializeLog", oneDNN and CPU features), the
converter's "Ignored output_format" lines, the int8 quantizer's "fully_quantize: ..." line.
Some of them are written by C++ code straight to file descriptor 2, past Python's logging:
`filtered_stderr` holds that descriptor and writes back what is not noise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

# Lines the TFLite converter writes straight to the process's stderr, past TensorFlow's log
# levels (int8 calibration, TF 2.21); `quiet_converter` drops them and passes on the rest.
CONVERTER_NOISE = ("fully_quantize: ",)
# Lines TensorFlow's import writes before its logging is set up, past TF_CPP_MIN_LOG_LEVEL (TF
# 2.21 where oneDNN is on, AMD EPYC CPUs for one); dropped unless the user chose a log level.
IMPORT_NOISE = ("absl::InitializeLog() is called", "oneDNN custom operations are on")


def import_tensorflow():
    """TensorFlow, with its C++ INFO and WARNING lines off unless the user chose a level.

    TF_CPP_MIN_LOG_LEVEL=2 keeps errors and drops the lines an export does not need (the oneDNN
    and CPU feature notes, the converter's "Ignored output_format" and "Estimated count of
    arithmetic ops"); it only counts before TensorFlow is first imported in the process.
    """
    if log_level_chosen():
        import tensorflow as tf

        return tf
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with filtered_stderr(IMPORT_NOISE):
        import tensorflow as tf

    return tf


def log_level_chosen() -> bool:
    """Whether TF_CPP_MIN_LOG_LEVEL is the user's: `import jax` sets it to '1' when unset."""
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if value != "1":
        return value is not None
    try:  # '1': the user's if the process started with it (Linux says), else jax's
        with open("/proc/self/environ", "rb") as f:
            return b"TF_CPP_MIN_LOG_LEVEL=1" in f.read().split(b"\0")
    except OSError:
        return False


@contextlib.contextmanager
def quiet_converter():
    """jax2tf and the TFLite converter without their INFO and WARNING lines; errors still show.

    The Python loggers of TensorFlow and absl (which jax2tf logs to) are raised to ERROR for the
    conversion. What the converter's C++ code writes to stderr is held in a temporary file and
    written back afterwards, less the `CONVERTER_NOISE` lines.
    """
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with filtered_stderr(CONVERTER_NOISE):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def filtered_stderr(noise: tuple[str, ...]):
    """Holds what is written to file descriptor 2; writes it back less the lines holding any of
    the strings in `noise`."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not any(n in line.decode(errors="replace") for n in noise)]  # fmt: skip
            if kept:
                os.write(2, b"".join(kept))
