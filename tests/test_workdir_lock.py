"""One run per workdir: the `.lock` flock, its message, its release by the kernel on SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_experiment import REPO, SHORT, SMOKE, results, run_experiment, without_run_fields

from experiments.configs import smoke
from mnres import run_folder, workdir_lock
from mnres.training import crossval

# Takes the lock of argv[1], says so, and holds it until killed.
HOLD_LOCK = """
import sys, time
from mnres import workdir_lock
workdir_lock.lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_lock_names_the_holder_and_the_release_frees_it(tmp_path):
    workdir = str(tmp_path / "run")
    with workdir_lock.lock(workdir) as held:
        holder = json.loads(open(held.path).read())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        # flock locks belong to an open file: a second open conflicts even in one process.
        with pytest.raises(workdir_lock.WorkdirBusyError) as busy:
            workdir_lock.lock(workdir)
    message = str(busy.value)
    assert workdir in message and f"process {os.getpid()} on {holder['host']}" in message
    assert holder["started"] in message and "\n" not in message
    assert open(os.path.join(workdir, run_folder.LOCK_FILE)).read() == ""  # emptied
    workdir_lock.lock(workdir).release()  # free again


def test_a_sigkilled_holder_leaves_nothing_locked(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"process {holder.pid} on"):
            workdir_lock.lock(workdir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead process's lock; its stale name in the file does not matter.
    with workdir_lock.lock(workdir) as held:
        assert json.loads(open(held.path).read())["pid"] == os.getpid()


def test_processes_other_than_0_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
    with workdir_lock.lock(str(tmp_path)):
        assert not (tmp_path / run_folder.LOCK_FILE).exists()


def test_crossval_on_a_live_workdir_stops_before_any_fold(tmp_path):
    workdir = str(tmp_path / "cv")
    held = workdir_lock.lock(workdir, run_folder.CROSSVAL)
    with held, pytest.raises(workdir_lock.WorkdirBusyError, match="in use"):
        crossval.run_crossval(smoke.get_config(), workdir, num_folds=2)
    assert sorted(os.listdir(workdir)) == [run_folder.LOCK_FILE, run_folder.MARK_JSON]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the first run ended before its first checkpoint"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_second_run_stops_at_once_and_a_killed_one_resumes(tmp_path, compilation_cache):
    workdir = tmp_path / "run"
    flags = (*SHORT, "--config.async_checkpointing=False")
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": compilation_cache}
    command = [
        sys.executable, "-m", "experiments.malaria", f"--config={SMOKE}", f"--workdir={workdir}",
        "--config.progress_bar=False", *flags,
    ]  # fmt: skip
    first = subprocess.Popen(command, cwd=REPO, env=environ, stderr=subprocess.DEVNULL)
    try:
        _wait_for(workdir / "checkpoints" / "latest" / "5", first)
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock, at a known point
        start = time.perf_counter()
        second = run_experiment(workdir, *flags, cache=compilation_cache, check=False)
        seconds = time.perf_counter() - start
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    last_line = second.stderr.strip().splitlines()[-1]
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert last_line.startswith(f"error: {workdir} is in use by another run (process {first.pid}")
    assert not (workdir / "report.json").exists()
    print(f"the second run stopped after {seconds:.1f} s")  # start-up included

    resumed = run_experiment(workdir, *flags, cache=compilation_cache)
    assert "Resuming from the checkpoint at step 5" in resumed.stderr
    assert (workdir / run_folder.LOCK_FILE).read_text() == ""
    history, before = (workdir / "metrics.jsonl").read_text(), results(workdir)
    # A finished workdir run again only evaluates again, under the lock like any run.
    again = run_experiment(workdir, *flags, cache=compilation_cache)
    assert "epoch 1/2" not in again.stderr and "epoch 2/2" not in again.stderr
    assert (workdir / "metrics.jsonl").read_text() == history
    assert without_run_fields(results(workdir)) == without_run_fields(before)


def test_workdir_with_other_files_is_not_written_over(tmp_path):
    workdir = tmp_path / "d"
    workdir.mkdir()
    mine = {"config.json": '{"mine": 1}\n', "report.md": "# mine\n", "roc.png": "png"}
    for name, text in mine.items():
        (workdir / name).write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.malaria", f"--config={SMOKE}", f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    said = "holds files that are not an mnres run (config.json, report.md, roc.png)"
    assert last.startswith(f"error: {workdir} {said}"), done.stderr[-2000:]
    assert {p.name: p.read_text() for p in workdir.iterdir()} == mine


def test_a_run_of_version_0_1_is_marked_on_resume(tmp_path):
    from test_run_folder import RUN_V0_1

    workdir = tmp_path / "run"
    shutil.copytree(RUN_V0_1, workdir)
    with workdir_lock.lock(str(workdir)):
        pass
    assert run_folder.read_json(str(workdir / run_folder.MARK_JSON)) == {"kind": "run"}


def test_an_empty_or_new_folder_is_marked_and_a_file_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/run"):
        workdir_lock.claim(str(tmp_path / name))
        assert os.listdir(tmp_path / name) == [run_folder.MARK_JSON]
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        workdir_lock.claim(str(tmp_path / "file"))
    with pytest.raises(PermissionError, match=r"cannot write into .* \(Not a directory\)"):
        workdir_lock.claim(str(tmp_path / "file" / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0o555) folder")
def test_a_read_only_workdir_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir(mode=0o555)
    with pytest.raises(PermissionError, match=r"cannot write into .* \(Permission denied\)"):
        workdir_lock.claim(str(workdir))
