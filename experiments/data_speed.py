r"""Input-pipeline speed: decode + cache time, then steady-state images/s with augmentation.

  python -m experiments.data_speed --dir=PATH/cell_images --image_size=128

Decodes the folder once (or reads `--cache_dir`), splits it by slide, prints the split
counts, then times the cached pipeline: host batches alone, and host batches + the jitted
`augment` (flips, rot90, colour jitter, scaling) on the default device, after warm-up.
`--source=synthetic` runs without data.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments import _cli
from mnres import config as config_lib
from mnres import data
from mnres.data import augment

_SOURCE = flags.DEFINE_enum("source", "folder", ["folder", "synthetic", "tfds"], "Data source.")
_DIR = flags.DEFINE_string("dir", None, "Folder with Parasitized/ and Uninfected/ (any depth).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Image side in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps (after warm-up).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "On-disk cache of decoded images.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decoding threads; 0: one per core.")
_SPLIT_BY = flags.DEFINE_enum("split_by", "slide", ["slide", "image"], "How to split.")
_SEED = flags.DEFINE_integer("seed", 0, "Split and batch-order seed.")
_MANIFEST = flags.DEFINE_string("manifest", None, "Where to write the split manifest (JSON).")


def images_per_second(step, batches, steps: int, warmup: int = 5) -> float:
    """Runs `step` on `warmup` then `steps` batches; returns timed images per second."""
    for _ in range(warmup):
        step(next(batches))
    count, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def main(argv):
    del argv
    config = config_lib.default_config().data
    config.source = _SOURCE.value
    config.dir = _DIR.value
    config.image_size = _IMAGE_SIZE.value
    config.cache_dir = _CACHE_DIR.value
    config.num_workers = _NUM_WORKERS.value
    config.split_by = _SPLIT_BY.value
    config.synthetic_size = 5000

    cache_files = lambda: (
        set(os.listdir(config.cache_dir))
        if config.cache_dir and os.path.isdir(config.cache_dir)
        else set()
    )
    before = cache_files()
    start = time.perf_counter()
    dataset = data.load_dataset(config, seed=_SEED.value)
    load_s = time.perf_counter() - start
    total = sum(s["num_examples"] for s in dataset.manifest["splits"].values())
    if not config.cache_dir:
        cached = " (no disk cache)"
    else:
        cached = " (decoded, cache written)" if cache_files() - before else " (read from the cache)"
    print(
        f"decode + resize + cache + split: {total} images at {config.image_size} px in "
        f"{load_s:.1f} s{cached} = {total / load_s:.0f} images/s; "
        f"{dataset.manifest['num_skipped']} skipped; "
        f"{dataset.train.images.nbytes / 2**20:.0f} MiB train images in memory"
    )
    for name, split in dataset.manifest["splits"].items():
        print(
            f"  {name:10s} {split['num_examples']:6d} images  parasitized "
            f"{split['counts']['parasitized']:6d}  uninfected {split['counts']['uninfected']:6d}  "
            f"slides {split['num_slides']:4d}"
        )
    if _MANIFEST.value:
        data.write_manifest(dataset, _MANIFEST.value)

    size = _BATCH_SIZE.value
    host = images_per_second(
        lambda b: b, data.train_batches(dataset.train, size, _SEED.value), _STEPS.value
    )
    print(f"host batches (uint8 gather): {host:,.0f} images/s")

    @jax.jit
    def augment_step(images, rng):
        return augment.augment(images, rng, config).mean()

    rng = jax.random.key(_SEED.value)

    def step(batch):
        jax.block_until_ready(augment_step(jax.device_put(batch["image"]), rng))

    full = images_per_second(
        step, data.train_batches(dataset.train, size, _SEED.value), _STEPS.value
    )
    prefetched = images_per_second(
        step, data.prefetch(data.train_batches(dataset.train, size, _SEED.value)), _STEPS.value
    )
    print(
        f"host batches + device transfer + jitted augmentation on {jax.devices()[0].platform}: "
        f"{full:,.0f} images/s ({prefetched:,.0f} images/s with data.prefetch)"
    )
    print(
        json.dumps(
            {
                "images": total,
                "image_size": config.image_size,
                "decode_cache_split_s": round(load_s, 2),
                "host_images_per_s": round(host),
                "augmented_images_per_s": round(full),
                "augmented_prefetched_images_per_s": round(prefetched),
                "batch_size": size,
                "devices": jax.device_count(),
                "cpu_cores": len(os.sched_getaffinity(0)),
            }
        )
    )
    np.testing.assert_equal(dataset.manifest["slides_in_several_splits"], [])


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
