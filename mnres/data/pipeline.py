"""Batches from decoded splits: endless, resumable training batches and exact, masked eval batches.

Images stay uint8 in host memory; a batch is one fancy-indexing copy, so the host side costs
~1 ms per batch. Conversion to float, augmentation and scaling happen on the device inside
the jitted step (`mnres.data.augment`).
"""

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from mnres.data.splits import Split


def _local_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"The global batch size {global_batch_size} must be a positive multiple "
            f"of the process count {process_count}; so that it shards evenly over "
            "all devices, make it a multiple of jax.device_count()."
        )
    return global_batch_size // process_count


def steps_per_epoch(split: Split, global_batch_size: int) -> int:
    """Full batches per epoch (the incomplete tail of each epoch is dropped)."""
    return len(split) // global_batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a function of (seed, epoch) only, equal on every host."""
    return np.random.default_rng([seed, epoch, 0xBA7C4]).permutation(num_examples)


def train_batches(
    split: Split,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Endless training batches; the batch of step k depends only on (seed, k).

    Epoch e = k // steps_per_epoch uses the permutation from (seed, e) and drops its
    incomplete tail. Resuming with `start_step=k` yields exactly what an uninterrupted run
    yields from step k on.

    Args:
      split: the decoded training split.
      global_batch_size: examples per step over all processes and devices.
      seed: the experiment seed.
      start_step: the first step to yield.
      process_index: this process (jax.process_index()).
      process_count: all processes (jax.process_count()).

    Yields:
      This process's contiguous 1/process_count slice of each global batch:
      {'image': uint8 [B/process_count, S, S, 3], 'label': int32 [B/process_count]}.
    """
    local = _local_size(global_batch_size, process_count)
    per_epoch = steps_per_epoch(split, global_batch_size)
    if per_epoch == 0:
        raise ValueError(
            f"The training split has {len(split)} examples, fewer than one global "
            f"batch of {global_batch_size}: use a smaller batch size or more data."
        )
    step = start_step
    epoch, order = None, None
    while True:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order = epoch_permutation(len(split), seed, epoch)
        first = (step % per_epoch) * global_batch_size + process_index * local
        idx = order[first : first + local]
        yield {"image": split.images[idx], "label": split.labels[idx].astype(np.int32)}
        step += 1


def eval_batches(
    split: Split, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict]:
    """Every example once, in a fixed order; the last batch is padded to full size.

    Yields:
      {'image': uint8 [B/process_count, S, S, 3], 'label': int32 [...], 'mask': bool [...]},
      where `mask` is False on padding, so every example is counted exactly once.
    """
    local = _local_size(global_batch_size, process_count)
    n = len(split)
    size = split.images.shape[1:]
    for start in range(0, n, global_batch_size):
        first = start + process_index * local
        idx = np.arange(first, min(first + local, n))
        pad = local - len(idx)
        image = split.images[idx]
        label = split.labels[idx].astype(np.int32)
        mask = np.ones(len(idx), bool)
        if pad:
            image = np.concatenate([image, np.zeros((pad, *size), image.dtype)])
            label = np.concatenate([label, np.zeros(pad, np.int32)])
            mask = np.concatenate([mask, np.zeros(pad, bool)])
        yield {"image": image, "label": label, "mask": mask}


def prefetch(batches: Iterable[dict], size: int = 2) -> Iterator[dict]:
    """Produces the next `size` batches in a background thread while the step runs.

    `size=0` returns `batches` unchanged. For the decoded in-memory splits of this module a
    batch is a microsecond-to-millisecond gather, and JAX's asynchronous dispatch already
    overlaps it with the running step; on a busy 2-core CPU the thread's GIL hand-offs cost
    more than they save (smoke config: data wait 1-15% of step time with the thread, 0-5%
    without). Use a thread where producing a batch is slow (decoding on the fly, remote
    reads).
    """
    if size <= 0:
        return iter(batches)
    return _threaded(batches, size)


def _threaded(batches: Iterable[dict], size: int) -> Iterator[dict]:
    buffer = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        buffer.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer.
            buffer.put(e)
            return
        buffer.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
