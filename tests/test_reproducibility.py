"""One command, one machine: two runs write the same files, a SIGKILLed and resumed one too.

The runs train the smoke config's tiny network on the 1,000 real NIH crops of malaria-mini at
32 px, each in its own process with its own compilation (no shared cache). Only the fields
that measure time (`mnres.training.loop.TIMING_FIELDS`) may differ; every other value of
metrics.jsonl, report.json, calibration.json, manifest.json, config.json, predictions_test.csv
and test_outputs.npz must be equal, bit for bit. Across machines they are not (docs/training.md,
"Reproducibility").
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import MINI_CELL_IMAGES

from mnres import run_folder
from mnres.training import loop

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
# 799 training crops in batches of 32: 24 steps an epoch. The kill comes once the checkpoint of
# epoch 2 is complete on disk, so the resumed run keeps two epochs and trains four again.
KILL_AFTER_STEP = 48
JSON_FILES = (
    run_folder.METRICS_JSONL,
    run_folder.REPORT_JSON,
    run_folder.CALIBRATION_JSON,
    run_folder.MANIFEST_JSON,
    run_folder.CONFIG_JSON,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MINI_CELL_IMAGES.is_dir(), reason="needs ../shared/data/malaria-mini"),
]


def _command(workdir) -> list[str]:
    return [
        sys.executable, "-m", "experiments.malaria", "--config=experiments/configs/smoke.py",
        f"--workdir={workdir}", "--config.progress_bar=False", "--config.data.source=folder",
        f"--config.data.dir={MINI_CELL_IMAGES}", "--config.data.image_size=32",
        f"--config.num_epochs={EPOCHS}",
    ]  # fmt: skip


def _environ() -> dict:
    # Nothing inherited that changes the program or skips its compilation.
    dropped = ("XLA_FLAGS", "MNRES_TEST_KILL_AT_STEP", "JAX_COMPILATION_CACHE_DIR")
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, "JAX_PLATFORMS": "cpu"}


def _train(workdir) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _command(workdir), cwd=REPO, env=_environ(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _sigkill_after_checkpoint(workdir, step: int) -> None:
    """Starts a run and SIGKILLs it once a complete checkpoint at or past `step` is on disk."""
    proc = subprocess.Popen(
        _command(workdir), cwd=REPO, env=_environ(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    latest = Path(workdir) / run_folder.CHECKPOINTS_DIR / "latest"
    deadline = time.monotonic() + 300
    try:
        # Orbax writes a checkpoint under a temporary name and renames it to its step when done.
        while not any(p.name.isdigit() and int(p.name) >= step for p in _listing(latest)):
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _without_timing(value):
    """`value` with every key named in `loop.TIMING_FIELDS` dropped, at any depth."""
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in loop.TIMING_FIELDS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _read(workdir: Path, name: str):
    text = (workdir / name).read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted, killed-and-resumed) run folders and the resumed command's log."""
    root = tmp_path_factory.mktemp("reproducibility")
    first, second = root / "first", root / "second"
    _train(first)
    _sigkill_after_checkpoint(second, KILL_AFTER_STEP)
    assert not (second / run_folder.REPORT_JSON).exists()
    resumed = _train(second)
    return first, second, resumed.stderr


def test_the_killed_run_resumed_from_its_checkpoint(runs):
    first, second, log = runs
    assert "Resuming from the checkpoint at step" in log
    step = int(log.split("Resuming from the checkpoint at step ")[1].split()[0])
    assert KILL_AFTER_STEP <= step < run_folder.read_report(str(first))["training"]["total_steps"]


def test_the_resumed_report_counts_the_epochs_its_earlier_command_trained(runs):
    first, second, log = runs
    step = int(log.split("Resuming from the checkpoint at step ")[1].split()[0])
    rows = _read(second, run_folder.METRICS_JSONL)
    earlier = [r for r in rows if r["step"] <= step]
    assert 0 < len(earlier) < len(rows)
    training = run_folder.read_report(str(second))["training"]
    assert training["earlier_epochs_seconds"] == pytest.approx(run_folder.epochs_seconds(earlier))
    assert run_folder.whole_run_seconds(training) > training["wall_seconds_this_run"]
    assert run_folder.read_report(str(first))["training"]["earlier_epochs_seconds"] == 0.0


@pytest.mark.parametrize("name", JSON_FILES)
def test_json_files_are_equal_but_for_timing(runs, name):
    first, second, _ = runs
    a, b = _read(first, name), _read(second, name)
    assert _without_timing(a) == _without_timing(b)
    if name == run_folder.METRICS_JSONL:
        assert [row["epoch"] for row in b] == list(range(1, EPOCHS + 1))
        # The timing fields are there, and measured (so they are what differs).
        assert all(set(loop.TIMING_FIELDS) & set(row) for row in b)


def test_predictions_and_test_outputs_are_equal(runs):
    first, second, _ = runs
    name = run_folder.PREDICTIONS_CSV
    assert (first / name).read_bytes() == (second / name).read_bytes()
    a, b = run_folder.read_test_outputs(str(first)), run_folder.read_test_outputs(str(second))
    assert set(a) == set(b) == {"log_odds", "labels", "slide_ids", "names"}
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
