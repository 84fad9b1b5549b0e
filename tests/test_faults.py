"""Faults during training: a checkpoint write that fails (as on a full disk), then a re-run.

The fault is real: the training process lowers its own RLIMIT_FSIZE right after the epoch-1
checkpoint is complete, so the epoch-2 checkpoint's files fail to grow (EFBIG, the error a full
disk gives as ENOSPC) inside orbax's writers. SIGXFSZ is ignored (CPython does so at start-up
too), so the write raises instead of the signal killing the process. SIGKILLs at random points:
tests/test_experiment.py.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from bad_inputs import _error_lines
from test_experiment import REPO, SHORT, SMOKE, results, run_experiment, without_run_fields

from mnres import run_folder
from mnres.training import checkpoint, loop

# `python -m experiments.malaria ARGS`, with the file size limit set once the checkpoint at
# step $FAULT_AFTER_CHECKPOINT is complete, its checksums written (an asynchronous save may
# still be writing them).
FAULTY_MALARIA = """
import os, resource, runpy, signal, sys, time
from mnres.training import loop
from mnres.training.checkpoint import CHECKSUMS_JSON as CHECKSUMS

after, limit = int(os.environ["FAULT_AFTER_CHECKPOINT"]), int(os.environ["FAULT_FILE_SIZE"])
train_and_evaluate = loop.train_and_evaluate

def faulty(config, workdir, *, after_step=None, **kwargs):
    def lower_the_limit(step):
        if step == after + 1:
            done = os.path.join(workdir, "checkpoints", "latest", str(after), CHECKSUMS)
            while not os.path.isfile(done):
                time.sleep(0.01)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    return train_and_evaluate(config, workdir, **kwargs, after_step=lower_the_limit)

loop.train_and_evaluate = faulty
sys.argv = ["experiments.malaria", *sys.argv[1:]]
runpy.run_module("experiments.malaria", run_name="__main__")
"""
# Above metrics.jsonl's two rows (~700 bytes), below the smoke model's checkpoint files.
FILE_SIZE_LIMIT = 8192


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compilation_cache):
    """An uninterrupted run of the short smoke config."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run_experiment(workdir, *SHORT, cache=compilation_cache)
    return workdir


def _history(workdir):
    """metrics.jsonl's rows, timing fields aside."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in loop.TIMING_FIELDS} for row in rows]


def _run_with_write_fault(workdir, flags, cache):
    environ = {
        **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "FAULT_AFTER_CHECKPOINT": "5",
        "FAULT_FILE_SIZE": str(FILE_SIZE_LIMIT),
    }
    command = [
        sys.executable, "-c", FAULTY_MALARIA, f"--config={SMOKE}", f"--workdir={workdir}",
        "--config.progress_bar=False", *flags,
    ]  # fmt: skip
    # The timeout is the "does not hang" check.
    return subprocess.run(
        command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_a_failed_checkpoint_write_stops_the_run_and_a_rerun_resumes(
    tmp_path, reference, compilation_cache, asynchronous
):
    workdir = tmp_path / "run"
    flags = (*SHORT, f"--config.async_checkpointing={asynchronous}")
    failed = _run_with_write_fault(workdir, flags, compilation_cache)
    assert failed.returncode == 1, failed.stderr[-3000:]
    # One line says it: orbax's errors of its failed writer threads are warnings, without
    # tracebacks, and the noise of its closed event loops is dropped.
    [line] = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert _error_lines(failed.stderr) == [line] and "Traceback" not in failed.stderr
    assert line.startswith("error: cannot write the checkpoint at step 10 in "), line
    assert "File too large" in line
    assert f"the checkpoint at step 5 in {workdir}/checkpoints/latest is complete" in line
    assert not (workdir / "report.json").exists()
    latest = workdir / "checkpoints" / "latest"
    # Orbax's half-written step stays a temporary folder: no "latest" points at it.
    assert checkpoint.complete_steps(str(latest)) == [5]
    assert any(name.startswith("10.orbax-checkpoint-tmp") for name in os.listdir(latest))
    assert (workdir / run_folder.LOCK_FILE).read_text() == ""  # released on the way out

    resumed = run_experiment(workdir, *flags, cache=compilation_cache)
    assert "Resuming from the checkpoint at step 5" in resumed.stderr
    assert checkpoint.complete_steps(str(latest)) == [5, 10]
    assert sorted(os.listdir(latest)) == ["10", "5"]  # the leftover was deleted
    assert _history(workdir) == _history(reference)
    assert without_run_fields(results(workdir)) == without_run_fields(results(reference))


@pytest.mark.slow
def test_a_lost_best_checkpoint_of_the_resumed_step_is_saved_again(
    tmp_path, reference, compilation_cache
):
    # A fault can lose best/5 while latest/5 is complete (two managers, two writes): the resumed
    # run must still evaluate the state of step 5, as the uninterrupted run does.
    workdir = tmp_path / "run"
    flags = (*SHORT, "--config.async_checkpointing=False")
    killed = run_experiment(workdir, *flags, cache=compilation_cache, check=False,
                            env={"MNRES_TEST_KILL_AT_STEP": "7"})  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert json.loads((reference / "report.json").read_text())["training"]["evaluated_step"] == 5
    shutil.rmtree(workdir / "checkpoints" / "best" / "5")
    run_experiment(workdir, *flags, cache=compilation_cache)
    assert checkpoint.complete_steps(str(workdir / "checkpoints" / "best")) == [5]
    assert without_run_fields(results(workdir)) == without_run_fields(results(reference))
