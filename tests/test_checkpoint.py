"""Orbax checkpoints of the train state: round trip, latest vs best, leftovers of a kill or of a
failed write."""

import contextlib
import json
import os
import resource
import signal

import jax
import ml_collections
import numpy as np
import optax
import pytest

from mnres import config as config_lib
from mnres import models
from mnres.models import params as params_lib
from mnres.training import checkpoint, optim, steps
from mnres.training.steps import TrainState


@pytest.fixture(scope="module")
def state_and_mesh():
    config = ml_collections.ConfigDict(
        dict(name="mobilenet_v1", alpha=0.25, num_blocks=1, bn_momentum=0.9)
    )
    model = models.from_config(config)
    shapes = params_lib.abstract_variables(model, (1, 32, 32, 3))
    optimizer = config_lib.default_config().optimizer
    tx, _ = optim.create_optimizer(optimizer, model, shapes["params"], 10, 1)
    mesh = steps.make_mesh()
    state = steps.init_state(model, tx, 32, 0, mesh)
    # One optimizer update, so the round trip covers non-zero Adam moments and counts too.
    updates, opt_state = jax.jit(tx.update)(state.params, state.opt_state, state.params)
    state = state.replace(
        params=optax.apply_updates(state.params, updates), opt_state=opt_state, step=state.step + 1
    )
    return state, mesh


def _equal(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b))


def test_round_trip_restores_values_structure_and_sharding(tmp_path, state_and_mesh):
    state, _ = state_and_mesh
    with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
        assert ckpts.latest_step() is None
        ckpts.save(1, state.to_dict())
        ckpts.wait()
    with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
        assert ckpts.latest_step() == 1
        restored = TrainState.from_dict(ckpts.restore(state.to_dict()))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _equal(jax.device_get(restored), jax.device_get(state))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.sharding == b.sharding and a.dtype == b.dtype
    with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
        as_saved = ckpts.restore(None)  # no target: what export/predict read
    assert _equal(jax.device_get(as_saved["params"]), jax.device_get(state.params))


def test_latest_keeps_k_and_best_keeps_the_best_one(tmp_path, state_and_mesh):
    state, _ = state_and_mesh
    with checkpoint.Checkpoints(str(tmp_path), keep=2, async_save=False) as ckpts:
        ckpts.save(10, state.to_dict(), best=True)
        ckpts.save(20, state.to_dict())
        ckpts.save(30, state.to_dict(), best=True)
        ckpts.save(30, state.to_dict(), best=True)  # again after a resume: skipped
        ckpts.save(35, state.to_dict(), latest=False, best=True)
        assert ckpts.latest.all_steps() == [20, 30]
        assert ckpts.best.all_steps() == [35]
        assert ckpts.best_step() == 35


def test_a_save_interrupted_by_a_kill_is_ignored(tmp_path, state_and_mesh):
    state, _ = state_and_mesh
    with checkpoint.Checkpoints(str(tmp_path), async_save=False) as ckpts:
        ckpts.save(5, state.to_dict())
    # What a process killed mid-save leaves: orbax's temporary folder for the next step.
    leftover = tmp_path / "latest" / "10.orbax-checkpoint-tmp-1234"
    leftover.mkdir()
    (leftover / "partial").write_text("x")
    with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
        assert ckpts.latest_step() == 5
        restored = ckpts.restore(state.to_dict())
    assert _equal(jax.device_get(restored["params"]), jax.device_get(state.params))


def test_restore_without_checkpoint_says_where(tmp_path, state_and_mesh):
    state, _ = state_and_mesh
    with checkpoint.Checkpoints(str(tmp_path)) as ckpts, pytest.raises(FileNotFoundError):
        ckpts.restore(state.to_dict(), best=True)


@contextlib.contextmanager
def _file_size_limit(max_bytes: int):
    """Writes past `max_bytes` fail with EFBIG in this process (SIGXFSZ ignored, as CPython does
    by default, so the write raises instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# Orbax's failed background save leaves a callback for an event loop it has closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_write_raises_and_leaves_the_last_complete_checkpoint(
    tmp_path, state_and_mesh, async_save
):
    state, _ = state_and_mesh
    # 1 MiB of noise (it does not compress) beside the state: a write the limit below refuses.
    noise = np.random.default_rng(0).standard_normal(2**18).astype(np.float32)
    saved = dict(state.to_dict(), noise=noise)
    ckpts = checkpoint.Checkpoints(str(tmp_path), async_save=async_save)
    ckpts.save(5, saved)
    ckpts.wait()
    with _file_size_limit(256 * 1024), pytest.raises(checkpoint.CheckpointWriteError) as error:
        ckpts.save(10, saved)
        ckpts.wait()  # an asynchronous save fails here
    ckpts.close()  # the failure is not raised a second time
    message = str(error.value)
    assert "checkpoint at step 10" in message and "File too large" in message, message
    assert f"step 5 in {tmp_path / 'latest'} is complete" in message and "\n" not in message
    # Orbax left its temporary folder; it is no checkpoint, and the next manager deletes it.
    assert [n for n in os.listdir(tmp_path / "latest") if n.startswith("10.")]
    assert checkpoint.complete_steps(str(tmp_path / "latest")) == [5]
    with checkpoint.Checkpoints(str(tmp_path), async_save=False) as again:
        assert again.latest_step() == 5
        np.testing.assert_array_equal(again.restore(None)["noise"], noise)
        again.save(10, saved)  # the step that failed, written whole this time
        assert again.latest.all_steps() == [5, 10]
    assert sorted(os.listdir(tmp_path / "latest")) == ["10", "5"]


def test_a_checkpoint_with_8_flipped_bytes_is_refused_in_one_line(tmp_path):
    from conftest import make_run

    checkpoints = tmp_path / "run" / "checkpoints"
    make_run(str(tmp_path / "run"))  # a MobileNetV2's state, saved as training saves it
    step_dir = checkpoints / "latest" / "7"
    assert (step_dir / checkpoint.CHECKSUMS_JSON).is_file()
    # 8 bytes flipped in the middle of the largest array file, as a failing disk would.
    files = list((step_dir / "default").glob("ocdbt.process_0/d/*"))
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(data)
    with checkpoint.Checkpoints(str(checkpoints), async_save=False) as ckpts:
        with pytest.raises(checkpoint.CheckpointCorruptError) as error:
            ckpts.restore(None)
    message = str(error.value)
    assert message.startswith(f"the checkpoint at step 7 in {step_dir.parent} is corrupt (")
    assert f"delete {step_dir} to resume from the checkpoint before it" in message
    assert "\n" not in message


def test_an_asynchronous_save_writes_its_checksums_in_its_step(tmp_path, state_and_mesh):
    state, _ = state_and_mesh
    with checkpoint.Checkpoints(str(tmp_path), async_save=True) as ckpts:
        ckpts.save(5, state.to_dict(), best=True)
    for manager in ("latest", "best"):
        saved = json.loads((tmp_path / manager / "5" / checkpoint.CHECKSUMS_JSON).read_text())
        assert saved == checkpoint.checksums(state.to_dict())


def test_asyncios_report_of_a_failed_orbax_write_is_one_warning_line():
    # tensorstore's error reaches asyncio's "Future exception was never retrieved" without
    # Python frames: the temporary checkpoint folder in its text says whose it is.
    import logging

    def record(error):
        return logging.LogRecord(
            "asyncio", logging.ERROR, "/usr/lib/python3/asyncio/base_events.py", 1805,
            "Future exception was never retrieved", None, (type(error), error, None),
        )  # fmt: skip

    write = ValueError(
        'OUT_OF_RANGE: Error writing "step/0" in OCDBT database at local file '
        '"/x/checkpoints/latest/10.orbax-checkpoint-tmp/default/": File too large'
    )
    orbax = record(write)
    assert checkpoint._orbax_errors_as_warnings(orbax)
    assert orbax.levelno == logging.WARNING and orbax.exc_info is None
    other = record(ValueError("something else"))
    checkpoint._orbax_errors_as_warnings(other)
    assert other.levelno == logging.ERROR and other.exc_info is not None
