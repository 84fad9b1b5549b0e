"""TensorBoard event files of a training run (`config.tensorboard`), written without TensorFlow.

The chief process writes them to the run folder's `tensorboard/` (`mnres.run_folder`), beside
metrics.jsonl. Each time the loop fetches the losses (every `config.log_every_steps` steps and at
an epoch's end), one point at that step: `train/loss` (the mean over the steps since the last
point), `train/learning_rate` (the schedule's value for the step's update) and
`train/images_per_sec` (training throughput since the last point or the epoch's start). After
each validation: `val/loss` and `val/accuracy`. A resumed run first drops from the files of
earlier runs the points after its checkpoint's step, as metrics.jsonl drops its rows, then
writes a new file: the steps continue without duplicates.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

TRAIN_LOSS = "train/loss"
LEARNING_RATE = "train/learning_rate"
IMAGES_PER_SEC = "train/images_per_sec"
VAL_LOSS = "val/loss"
VAL_ACCURACY = "val/accuracy"

# A new file name for each writer of this process, however fast a run is resumed.
_file_numbers = itertools.count()


def _modules():
    """The tensorboard package's protos and record framing; ImportError naming the extra.

    Not tensorboardX, which imports torch when it is installed (the `bench` extra), and not
    tensorboard's own EventFileWriter, which opens files through `tf.io.gfile` and so imports
    TensorFlow when it is installed (the `tfds` and `export` extras): the record framing and the
    protos below import neither, and come with the package that reads the files anyway.
    """
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer import record_writer
    except ImportError as e:
        raise ImportError(
            f"config.tensorboard=True needs the tensorboard package ({e}): "
            "pip install 'mnres[tensorboard]'"
        ) from e
    return event_pb2, summary_pb2, record_writer


def check_installed() -> None:
    """Raises ImportError (one line: pip install 'mnres[tensorboard]') without the package."""
    _modules()


class Writer:
    """Scalars of one training run, from `step` on, into a new event file in `logdir`."""

    def __init__(self, logdir: str, step: int):
        """Creates `logdir`, drops the points after `step` from its files, opens a new file.

        Args:
          logdir: the run's TensorBoard folder.
          step: the step training resumes from (0 for a new run).
        """
        self._event_pb2, self._summary_pb2, record_writer = _modules()
        os.makedirs(logdir, exist_ok=True)
        drop_after(logdir, step)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_file_numbers)}"
        )
        self.path = os.path.join(logdir, name)
        self._records = record_writer.RecordWriter(open(self.path, "wb"))
        self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def train(self, step: int, *, loss: float, learning_rate: float, images_per_sec: float):
        """The training point at `step` (see the module docstring)."""
        self.scalars(
            step,
            {TRAIN_LOSS: loss, LEARNING_RATE: learning_rate, IMAGES_PER_SEC: images_per_sec},
        )

    def epoch(self, row: dict) -> None:
        """The validation figures of an epoch's metrics.jsonl row, then a flush.

        Flushed here, before the epoch's checkpoint: a resume keeps the points up to its step.
        """
        self.scalars(
            row["step"], {VAL_LOSS: row.get("val_loss"), VAL_ACCURACY: row.get("val_accuracy")}
        )
        self.flush()

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """One event at `step` with a scalar per tag; None values are left out."""
        summary = self._summary_pb2.Summary(
            value=[
                self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                for tag, value in values.items()
                if value is not None
            ]
        )
        if summary.value:
            self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _records(path: str) -> list[bytes]:
    """The serialized `Event`s of one event file, up to a torn or corrupt record (a kill)."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    records, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        end = pos + 12 + length + 4
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc32c(header):
            break
        if end > len(data):
            break
        record = data[pos + 12 : end - 4]
        if struct.unpack("<I", data[end - 4 : end])[0] != masked_crc32c(record):
            break
        records.append(record)
        pos = end
    return records


def drop_after(logdir: str, step: int) -> None:
    """Rewrites the event files in `logdir` without their points after `step`.

    A file left with no point is removed; a file with nothing to drop is not touched.
    """
    event_pb2, _, record_writer = _modules()
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        records = _records(path)
        kept, points = [], 0
        for record in records:
            event = event_pb2.Event.FromString(record)
            if event.HasField("summary") and event.step > step:
                continue
            kept.append(record)
            points += event.HasField("summary")
        if len(kept) == len(records) and os.path.getsize(path) == _size(records):
            continue
        if not points:
            os.remove(path)
            continue
        # Not named *tfevents*: TensorBoard would read a copy left by a kill.
        partial = os.path.join(logdir, ".drop_after.tmp")
        with open(partial, "wb") as f:
            writer = record_writer.RecordWriter(f)
            for record in kept:
                writer.write(record)
        os.replace(partial, path)


def _size(records: list[bytes]) -> int:
    return sum(16 + len(r) for r in records)
