"""experiments.eval_memory: its queued loop sees every crop once; the table reads back.

The other loop is `steps.evaluate`, which tests/test_train.py checks."""

import sys

import pytest

from experiments import eval_memory


def test_the_queued_loop_evaluates_every_crop_once_and_reports_a_peak():
    job = {"allocator": "default", "loop": "queued", "crops": 20, "batch": 8,
           "image_size": 32, "alpha": 0.35}  # fmt: skip
    result = eval_memory._worker(job)  # 3 batches, the last padded; it asserts the count
    assert result["peak_gb"] > 0.1 and result["seconds"] > 0


@pytest.mark.parametrize("flag", ["--crops=512,x", "--crops=0", "--loops=queued,fast"])
def test_a_malformed_flag_is_a_usage_error_naming_it(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_memory.main([flag])
    assert exit_.value.code == 2  # argparse's usage error, before any measurement
    assert flag.split("=")[1] in capsys.readouterr().err


@pytest.mark.slow
def test_the_table_has_a_row_per_measurement(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["eval_memory"])
    eval_memory.main(["--image_size=32", "--alpha=0.35", "--crops=9", "--loops=queued",
                      "--allocators=default"])  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[-1][:3] == ["default", "queued", "9"], rows
    assert float(rows[-1][3]) > 0.1  # peak GB of a process that ran JAX
