"""The three sources (tfds, folder, synthetic) behind one call: `load_dataset(config, seed)`.

Every source gives RGB uint8 images resized to `config.image_size`, int32 labels and slide ids
where known. Malaria labels are 1 = parasitized (the positive class) and 0 = uninfected; a
folder in the ImageFolder layout (one subfolder per class, any classes) labels each image
with its class's index, classes sorted by name (`mnres.data.folders.list_folder`).
"""

import os

import numpy as np
from absl import logging

from mnres.config.schema import MALARIA_CLASSES, SPLIT_NAMES, check_data
from mnres.data import decode, synthetic
from mnres.data.folders import list_folder
from mnres.data.splits import (
    Dataset,
    Split,
    build_manifest,
    checked_dataset,
    resolve_split_by,
    split_indices,
    take_splits,
)

_ALTERNATIVES = (
    "Offline, use the folder source on an extracted copy of the NIH cell_images.zip:\n"
    "  python -m experiments.malaria --config=experiments/configs/default.py "
    "--config.data.source=folder --config.data.dir=PATH/cell_images\n"
    "or the synthetic cells (no data needed):\n"
    "  python -m experiments.malaria --config=experiments/configs/smoke.py"
)


def load_dataset(data_config, seed: int) -> Dataset:
    """Loads, decodes (once) and splits the data named by `data_config` (`config.data`).

    Args:
      data_config: the `config.data` block (see `mnres.config.default_config`).
      seed: the experiment seed; folder and synthetic splits (and the synthetic cells) are a
        function of it, or of `data_config.split_seed` when that is set.

    Returns:
      A `Dataset` with train/validation/test `Split`s and the split manifest.
    """
    check_data(data_config)
    if data_config.get("split_seed") is not None:
        seed = int(data_config.split_seed)
    loader = {"tfds": _load_tfds, "folder": _load_folder, "synthetic": _load_synthetic}
    return loader[data_config.source](data_config, seed)


def _decode_folder(root: str, config, desc: str):
    listing = list_folder(root, config.class_names)
    fingerprints = []
    for path in listing["paths"]:
        st = os.stat(path)
        fingerprints.append(f"{st.st_size}:{st.st_mtime_ns}")
    images, kept, skipped = decode.decode_cached(
        listing["paths"],
        listing["names"],
        config.image_size,
        cache_dir=config.cache_dir,
        fingerprints=fingerprints,
        num_workers=config.num_workers,
        desc=desc,
    )
    if len(kept) == 0:
        raise ValueError(
            f"None of the {len(listing['names'])} images below {root!r} could be "
            "read (see the warnings above); check the files or use another source."
        )
    split = Split(
        images, listing["labels"][kept], listing["slide_ids"][kept], listing["names"][kept]
    )
    return split, skipped, listing


def _load_folder(config, seed: int) -> Dataset:
    pool, skipped, listing = _decode_folder(config.dir, config, "decoding " + config.dir)
    class_names = listing["class_names"]
    fractions = tuple(config.split_fractions)
    extra = {"dir": config.dir, "duplicates_ignored": listing["duplicates"]}
    check_fractions = fractions
    if config.test_dir:
        test, test_skipped, test_listing = _decode_folder(
            config.test_dir, config, "decoding " + config.test_dir
        )
        if test_listing["class_names"] != class_names:
            raise ValueError(
                f"config.data.test_dir={config.test_dir!r} has the classes "
                f"{test_listing['class_names']}, config.data.dir {class_names}: give both the "
                "same class folders."
            )
        # The test fraction is unused: train and validation share all of config.data.dir.
        fractions = (
            fractions[0] / (fractions[0] + fractions[1]),
            fractions[1] / (fractions[0] + fractions[1]),
            0.0,
        )
        check_fractions = (*fractions[:2], 1.0)
        skipped = skipped + [dict(s, name="test_dir:" + s["name"]) for s in test_skipped]
        extra.update(test_dir=config.test_dir, test_duplicates_ignored=test_listing["duplicates"])
    split_by = _split_rule(config, pool)
    parts = split_indices(pool.labels, pool.slide_ids, fractions, split_by, seed)
    splits = take_splits(pool, parts)
    if config.test_dir:
        splits["test"] = Split(
            test.images,
            test.labels,
            test.slide_ids,
            np.array(["test_dir:" + n for n in test.names]),
        )
    return _checked(
        splits, check_fractions, config, seed, "folder", skipped, extra, split_by, class_names
    )


def _split_rule(config, pool: Split) -> str:
    """`config.split_by`, with 'auto' resolved from the pool's slide ids (logged)."""
    split_by = resolve_split_by(config.split_by, pool.slide_ids)
    if config.split_by == "auto":
        slides = len({s for s in pool.slide_ids if s})
        if split_by == "slide":
            logging.info(
                "config.data.split_by='auto': %d slides in the file names (NIH naming), so no "
                "slide is in two splits.", slides,
            )  # fmt: skip
        else:
            logging.info(
                "config.data.split_by='auto': none of the %d file names carries an NIH slide "
                "id, so the split is by image (stratified by class).", len(pool),
            )  # fmt: skip
    return split_by


def _load_synthetic(config, seed: int) -> Dataset:
    images, labels, slides = synthetic.draw_cells(
        config.synthetic_size, config.image_size, config.num_slides, seed
    )
    names = np.array([f"synthetic:{i:06d}" for i in range(len(labels))])
    fractions = tuple(config.split_fractions)
    pool = Split(images, labels, slides, names)
    split_by = _split_rule(config, pool)
    splits = take_splits(pool, split_indices(labels, slides, fractions, split_by, seed))
    extra = {"synthetic_size": config.synthetic_size, "num_slides": config.num_slides}
    return _checked(splits, fractions, config, seed, "synthetic", [], extra, split_by)


def _checked(
    splits, check_fractions, config, seed, source, skipped, extra, split_by, class_names=None
) -> Dataset:
    """`checked_dataset` of a folder or synthetic split by `split_by` (`config.split_by`, with
    'auto' resolved; the manifest then records that it was asked for)."""
    if config.split_by == "auto":
        extra = {**extra, "split_by_requested": "auto"}
    return checked_dataset(
        splits,
        check_fractions,
        f"split by {split_by}",
        class_names or MALARIA_CLASSES,
        source=source,
        seed=seed,
        image_size=config.image_size,
        split_by=split_by,
        skipped=skipped,
        extra=extra,
    )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"The tfds source needs tensorflow-datasets ({e}): pip install 'mnres[tfds]' "
            "(tensorflow-datasets, and TensorFlow to prepare the data).\n" + _ALTERNATIVES
        ) from e
    return tfds


def _tensorflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _check_download_possible(builder) -> None:
    """Fails in seconds, not after minutes of download retries, without TF or a network."""
    if not _tensorflow_installed():
        raise ImportError("tensorflow is not installed")
    import socket
    import sys
    import urllib.parse

    url = getattr(sys.modules.get(type(builder).__module__), "_URL", None)
    host = urllib.parse.urlparse(url).hostname if isinstance(url, str) else None
    if host is None:  # the builder changed: let TFDS try
        return
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {host} ({e}): no network?") from e


def tfds_split_specs(config, num_train: int) -> dict:
    """TFDS slice string per split: `config.tfds_splits`, or cut from `split_fractions`.

    With every `tfds_splits` entry unset, the one TFDS split `train` is cut into absolute
    ranges from `split_fractions` (`train[0:22046]`, ...): the same on any machine. With some
    set, the unset ones are empty.
    """
    given = {name: config.tfds_splits[name] for name in SPLIT_NAMES}
    if any(given.values()):
        return {name: spec or "" for name, spec in given.items()}
    cuts = np.round(np.cumsum((0.0,) + tuple(config.split_fractions)) * num_train).astype(int)
    cuts[-1] = num_train
    return {
        name: f"train[{cuts[k]}:{cuts[k + 1]}]" if cuts[k + 1] > cuts[k] else ""
        for k, name in enumerate(SPLIT_NAMES)
    }


def _load_tfds(config, seed: int) -> Dataset:
    tfds = _import_tfds()
    builder = tfds.builder("malaria", data_dir=config.tfds_data_dir, file_format="array_record")
    if not builder.is_prepared():
        _prepare_tfds(builder)
    label_names = list(builder.info.features["label"].names)
    to_ours = np.array([1 if n == "parasitized" else 0 for n in label_names], np.int32)
    decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        num_train = len(builder.as_data_source(split="train", decoders=decoders))
    except Exception as e:  # noqa: BLE001 - e.g. a copy prepared as tfrecord only.
        raise RuntimeError(
            f"TFDS malaria in {builder.data_dir} cannot be read as a data source "
            f"({type(e).__name__}: {e}). mnres reads the array_record format: prepare it "
            "again with file_format='array_record' (delete that folder, or set "
            "config.data.tfds_data_dir to a new one; needs pip install 'mnres[tfds]').\n"
            + _ALTERNATIVES
        ) from e
    specs = tfds_split_specs(config, num_train)
    splits, skipped = {}, []
    for name in SPLIT_NAMES:
        split, split_skipped = _read_tfds_split(builder, specs[name], decoders, to_ours, config)
        splits[name] = split
        skipped += split_skipped
    for name in SPLIT_NAMES:
        if specs[name] and len(splits[name]) == 0:
            raise ValueError(
                f"TFDS split {specs[name]!r} ({name}) is empty: fix "
                f"config.data.tfds_splits.{name} or config.data.split_fractions."
            )
    manifest = build_manifest(
        splits,
        source="tfds",
        seed=seed,
        image_size=config.image_size,
        split_by="image",
        skipped=skipped,
        extra={
            "tfds_splits": specs,
            "tfds_version": str(builder.info.version),
            "tfds_label_names": label_names,
            "warning": "TFDS malaria splits are image-level: cells of one patient can be "
            "in several splits. Use the folder source for slide-level splits.",
        },
    )
    return Dataset(**splits, manifest=manifest)


def _prepare_tfds(builder) -> None:
    """Downloads and prepares TFDS malaria (once), or says what to install or use instead."""
    try:
        _check_download_possible(builder)
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # noqa: BLE001 - any failure here gets the same advice.
        need_tf = (
            ""
            if _tensorflow_installed()
            else (
                "TensorFlow is not installed, and the malaria builder calls tf.io.gfile: "
                "pip install 'mnres[tfds]' (or pip install tensorflow-cpu).\n"
            )
        )
        raise RuntimeError(
            f"Could not download and prepare TFDS malaria in {builder.data_dir}: "
            f"{type(e).__name__}: {e}\nPreparing it downloads cell_images.zip (350 MB) from "
            "the NIH once and needs TensorFlow (pip install 'mnres[tfds]'); reading it back "
            f"afterwards does not.\n{need_tf}{_ALTERNATIVES}"
        ) from e


def _read_tfds_split(builder, spec: str, decoders, to_ours, config):
    size = config.image_size
    if not spec:
        return Split(
            np.zeros((0, size, size, 3), np.uint8),
            np.zeros(0, np.int32),
            np.zeros(0, "<U1"),
            np.zeros(0, "<U1"),
        ), []
    source = builder.as_data_source(split=spec, decoders=decoders)
    n = len(source)
    base, offset = _absolute_start(builder, spec)
    names = np.array([f"tfds:{base}:{offset + i}" for i in range(n)])
    encoded, labels = [], np.zeros(n, np.int32)
    for i in range(n):
        example = source[i]
        encoded.append(example["image"])
        labels[i] = to_ours[int(example["label"])]
    images, kept, skipped = decode.decode_cached(
        encoded,
        names,
        size,
        cache_dir=config.cache_dir,
        fingerprints=[f"malaria:{builder.info.version}"] * n,
        num_workers=config.num_workers,
        desc=f"decoding tfds {spec}",
    )
    return Split(images, labels[kept], np.full(len(kept), ""), names[kept]), skipped


def _absolute_start(builder, spec: str) -> tuple[str, int]:
    """('train', first index) for a one-range spec like 'train[10%:]', else (spec, 0)."""
    import tensorflow_datasets as tfds

    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits)
    except Exception:  # noqa: BLE001 - e.g. split sizes unknown (mocked TFDS): name by spec.
        return spec, 0
    if len(instructions) != 1:
        return spec, 0
    return instructions[0].splitname, int(instructions[0].from_ or 0)
