"""`python -m mnres export` prints its own lines, not TensorFlow's and the TFLite converter's.

Without care an export to TFLite writes some ten lines to stderr (TF 2.21): the absl
"InitializeLog" note, the converter's `W0000 ... Ignored output_format` lines, the int8
quantizer's `fully_quantize: 0, ...` line and, depending on the CPU, the oneDNN and CPU feature
notes. `mnres.deploy.tensorflow_logs` turns them off; errors still show.
"""

import logging
import os
import subprocess
import sys

import pytest
from conftest import IMAGE_SIZE, needs_tflite
from PIL import Image

from mnres.data import synthetic
from mnres.deploy import tensorflow_logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow and the converter print when nothing quiets them (or with other versions).
NOISE = (
    "oneDNN custom operations",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "Estimated count of arithmetic ops",
    "absl::InitializeLog",
    "Ignored output_format",
    "Ignored drop_control_dependency",
    "Skipping runtime version metadata",
    "fully_quantize:",
    "W0000 ",
    "I0000 ",
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "PYTHONPATH": REPO, **extra}


@pytest.mark.slow  # ~35 s on a 2-core CPU: the tiny run, TensorFlow's import, two conversions
@needs_tflite
def test_export_to_tflite_prints_no_tensorflow_lines(run, tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    for i, image in enumerate(synthetic.draw_cells(8, IMAGE_SIZE, 3, 1)[0]):
        Image.fromarray(image).save(cells / f"cell_{i}.png")
    out = tmp_path / "export"
    command = [sys.executable, "-m", "mnres", "export", run, "--out", str(out),
               "--formats", "tflite,int8", "--calibration-dir", str(cells)]  # fmt: skip
    result = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["tflite", "int8"], result.stdout
    noisy = [line for line in result.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "TensorFlow/converter lines on stderr:\n" + result.stderr


def test_converter_stderr_keeps_errors_and_drops_the_noise_lines(capfd):
    sys.stderr.write("before\n")
    with tensorflow_logs.filtered_stderr(tensorflow_logs.CONVERTER_NOISE):
        # As the converter's C++ code writes: to file descriptor 2, past sys.stderr.
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32\n")
        os.write(2, b"E0000 00:00:1.0 quantize_model.cc:1] a real error\n")
    sys.stderr.write("after\n")
    err = capfd.readouterr().err
    assert err.splitlines() == [
        "before",
        "E0000 00:00:1.0 quantize_model.cc:1] a real error",
        "after",
    ]


def test_converter_stderr_is_written_back_when_the_conversion_fails(capfd):
    with pytest.raises(RuntimeError, match="converter failed"):
        with tensorflow_logs.quiet_converter():
            os.write(2, b"E0000 the reason it failed\n")
            raise RuntimeError("converter failed")
    assert capfd.readouterr().err == "E0000 the reason it failed\n"
    os.write(2, b"stderr is back\n")
    assert capfd.readouterr().err == "stderr is back\n"


@pytest.mark.parametrize(
    "start, chosen",
    [({}, False), ({"TF_CPP_MIN_LOG_LEVEL": "1"}, True), ({"TF_CPP_MIN_LOG_LEVEL": "0"}, True)],
)
def test_a_log_level_the_user_set_is_kept(start, chosen):
    # `import jax` sets TF_CPP_MIN_LOG_LEVEL=1 when unset: that 1 is not the user's choice.
    code = (
        "import os; from mnres.deploy import tensorflow_logs; "
        "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], tensorflow_logs.log_level_chosen())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(**start), capture_output=True, text=True,
        timeout=300, cwd=REPO, check=True,
    )  # fmt: skip
    level, said = result.stdout.split()
    assert level == start.get("TF_CPP_MIN_LOG_LEVEL", "1")
    assert said == str(chosen)


def test_quiet_converter_restores_the_logger_levels():
    logger = logging.getLogger("absl")
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        with tensorflow_logs.quiet_converter():
            assert logger.level == logging.ERROR
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(before)


def test_tensorflow_import_notes_are_dropped_wherever_they_sit_in_the_line(capfd):
    with tensorflow_logs.filtered_stderr(tensorflow_logs.IMPORT_NOISE):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are...\n")
        os.write(2, b"I0000 00:00:1.0 port.cc:153] oneDNN custom operations are on. You may...\n")
        os.write(2, b"ImportError: a real failure\n")
    assert capfd.readouterr().err.splitlines() == ["ImportError: a real failure"]
