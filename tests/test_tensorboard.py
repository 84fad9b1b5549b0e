"""TensorBoard event files (`config.tensorboard`): the curves, resuming, and no TensorFlow.

The files are read back with TensorBoard's own TensorFlow-free record reader (the one it uses
when TensorFlow is not installed) and its `Event` proto: `EventAccumulator` would import
TensorFlow into the test process wherever it is installed, which takes longer than the run.
"""

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_config

from mnres import config as config_lib
from mnres import run_folder
from mnres.training import optim
from mnres.training import tensorboard as tb

pytest.importorskip("tensorboard", reason="needs pip install -e '.[test]' (the tensorboard extra)")

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 4
STOP_AT = 9  # the first run stops here: after the checkpoint at step 6 and the point at 8

# The tiny run, interrupted and resumed in one process, then a run with the field off (stopped
# after one step); last, which TensorFlow modules the process imported. Prints one JSON line.
SCRIPT = """
import json, os, sys
from test_tensorboard import STOP_AT, read_scalars, tiny_config
from mnres import run_folder
from mnres.training import loop

class Stop(Exception):
    pass

def stop_at(step):
    def after_step(s):
        if s == step:
            raise Stop
    return after_step

on, off = sys.argv[1:]
try:
    loop.train_and_evaluate(tiny_config(), on, after_step=stop_at(STOP_AT))
except Stop:
    pass
before = read_scalars(os.path.join(on, run_folder.TENSORBOARD_DIR))
loop.train_and_evaluate(tiny_config(), on)
config = tiny_config()
config.tensorboard = False
try:
    loop.train_and_evaluate(config, off, after_step=stop_at(1))
except Stop:
    pass
imported = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
print(json.dumps({"before_resume": before, "tensorflow": imported}))
"""


def tiny_config():
    """conftest's tiny run on the smoke config's model: 6 steps of 16 per epoch, 2 epochs."""
    config = run_config(name="mobilenet_v1_residual", alpha=0.25, num_blocks=3, bn_momentum=0.5)
    config.data.split_by = "image"  # conftest's 6 slides are too few to split by slide
    config.batch_size, config.eval_batch_size, config.num_epochs = 16, 64, 2
    config.log_every_steps = LOG_EVERY
    config.test_time_augmentation = False
    config.progress_bar = False
    config.async_checkpointing = False
    config.tensorboard = True
    return config


def read_events(logdir) -> dict[str, list]:
    """{event file name: its Events}, read with TensorBoard's TensorFlow-free record reader."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    files = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        reader, events = pywrap_tensorflow.PyRecordReader_New(str(path)), []
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            events.append(event_pb2.Event.FromString(reader.record()))
        files[path.name] = events
    return files


def read_scalars(logdir) -> dict[str, list[list]]:
    """{tag: [[step, value], ...]} over every event file, in file order."""
    scalars = collections.defaultdict(list)
    for events in read_events(logdir).values():
        for event in events:
            for value in event.summary.value:
                scalars[value.tag].append([event.step, value.simple_value])
    return dict(scalars)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    on, off = root / "on", root / "off"
    env = {
        **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        # The resumed run and the run with the field off compile nothing again.
        "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(on), str(off)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"on": on, "off": off, **result}


def test_event_files_hold_the_curves_at_the_log_cadence(runs):
    workdir = runs["on"]
    rows = run_folder.read_history(str(workdir))
    config = tiny_config()
    per_epoch = rows[0]["step"]
    total = per_epoch * config.num_epochs
    assert [r["step"] for r in rows] == [per_epoch, total]
    assert per_epoch % LOG_EVERY  # an epoch ends between two logging steps
    scalars = read_scalars(workdir / run_folder.TENSORBOARD_DIR)
    assert set(scalars) == {tb.TRAIN_LOSS, tb.LEARNING_RATE, tb.IMAGES_PER_SEC, tb.VAL_LOSS,
                            tb.VAL_ACCURACY}  # fmt: skip
    # Every log_every_steps steps and at each epoch's end, each step once, in order.
    cadence = [s for s in range(1, total + 1) if s % LOG_EVERY == 0 or s % per_epoch == 0]
    for tag in (tb.TRAIN_LOSS, tb.LEARNING_RATE, tb.IMAGES_PER_SEC):
        assert [step for step, _ in scalars[tag]] == cadence, tag
    schedule = optim.learning_rate_schedule(config.optimizer, per_epoch, config.num_epochs)
    for step, lr in scalars[tb.LEARNING_RATE]:
        assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-6), step
    assert all(math.isfinite(v) and v > 0 for _, v in scalars[tb.IMAGES_PER_SEC])
    # Each point is the mean loss of the steps since the previous one: weighted by those step
    # counts, an epoch's points give its metrics.jsonl train_loss.
    losses = {step: loss for step, loss in scalars[tb.TRAIN_LOSS]}
    for row in rows:
        steps = [s for s in cadence if row["step"] - per_epoch < s <= row["step"]]
        widths = [b - a for a, b in zip([row["step"] - per_epoch, *steps], steps, strict=False)]
        mean = sum(w * losses[s] for w, s in zip(widths, steps, strict=True)) / per_epoch
        assert mean == pytest.approx(row["train_loss"], rel=1e-5), row["epoch"]
    # Validation once per epoch, the figures of metrics.jsonl.
    for tag, field in ((tb.VAL_LOSS, "val_loss"), (tb.VAL_ACCURACY, "val_accuracy")):
        assert scalars[tag] == [[r["step"], pytest.approx(r[field], rel=1e-6)] for r in rows]


def test_resuming_drops_the_points_after_the_checkpoint_and_continues(runs):
    before = runs["before_resume"]
    # The stopped run had logged step 8, after its checkpoint at step 6.
    assert [s for s, _ in before[tb.TRAIN_LOSS]] == [4, 6, 8]
    assert [s for s, _ in before[tb.VAL_LOSS]] == [6]
    files = read_events(runs["on"] / run_folder.TENSORBOARD_DIR)
    assert len(files) == 2  # the first run's, rewritten without step 8, and the resumed run's
    first, second = ([e.step for e in events if e.summary.value] for events in files.values())
    assert max(first) == 6 and min(second) == 8
    for events in files.values():
        assert events[0].file_version == "brain.Event:2"


def test_the_training_process_imports_no_tensorflow(runs):
    assert runs["tensorflow"] == []


def test_switched_off_no_folder(runs):
    assert (runs["off"] / run_folder.CONFIG_JSON).is_file()  # the run started
    assert not (runs["off"] / run_folder.TENSORBOARD_DIR).exists()


def test_resume_keeps_points_up_to_its_step_and_skips_a_torn_record(tmp_path):
    logdir = str(tmp_path)
    with tb.Writer(logdir, 0) as writer:
        for step in (2, 4, 6):
            writer.train(step, loss=1.0 / step, learning_rate=0.1, images_per_sec=10.0)
        writer.epoch({"step": 6, "val_loss": 0.5, "val_accuracy": None})
    with open(writer.path, "ab") as f:
        f.write(b"\x10\x00\x00")  # a record cut short by a kill
    tb.Writer(logdir, 4).close()
    scalars = read_scalars(logdir)
    assert [s for s, _ in scalars[tb.TRAIN_LOSS]] == [2, 4]
    assert tb.VAL_LOSS not in scalars and tb.VAL_ACCURACY not in scalars
    tb.Writer(logdir, 0).close()  # nothing left: the first file goes, the empty ones stay
    assert read_scalars(logdir) == {}
    assert os.path.basename(writer.path) not in os.listdir(logdir)


def test_without_the_package_config_validation_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboard...` now fails
    config = tiny_config()
    with pytest.raises(config_lib.ConfigError) as refused:
        config_lib.validate(config)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("config.tensorboard=True") and "pip install 'mnres[tensorboard]'" in line
    with pytest.raises(ImportError, match=r"pip install 'mnres\[tensorboard\]'"):
        tb.Writer(os.path.join("unused", run_folder.TENSORBOARD_DIR), 0)
    config.tensorboard = False
    config_lib.validate(config)


def test_the_field_is_a_bool():
    config = tiny_config()
    config = type(config)(config.to_dict(), type_safe=False)
    config.tensorboard = "yes"
    with pytest.raises(config_lib.ConfigError, match=r"config.tensorboard='yes'.*True"):
        config_lib.validate(config)
