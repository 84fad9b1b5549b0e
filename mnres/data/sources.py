"""The three sources (tfds, folder, synthetic) behind one call: `load_dataset(config, seed)`.

Every source gives RGB uint8 images resized to `config.image_size`, int32 labels with
1 = parasitized (the positive class) and 0 = uninfected, and slide ids where known.
"""

import os
import re

import numpy as np

from mnres.data import decode, synthetic
from mnres.data.config import SPLIT_NAMES, check
from mnres.data.splits import (
    Dataset,
    Split,
    build_manifest,
    checked_dataset,
    split_indices,
    take_splits,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CLASS_FOLDERS = {"parasitized": 1, "uninfected": 0}  # folder name (any case) -> label.
_SLIDE_ID = re.compile(r"^(.+?)_?thin", re.IGNORECASE)

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
      data_config: the `config.data` block (see `default_config`).
      seed: the experiment seed; folder and synthetic splits are a function of it.

    Returns:
      A `Dataset` with train/validation/test `Split`s and the split manifest.
    """
    check(data_config)
    loader = {"tfds": _load_tfds, "folder": _load_folder, "synthetic": _load_synthetic}
    return loader[data_config.source](data_config, seed)


def slide_id(file_name: str) -> str:
    """NIH slide id: the file-name prefix before 'ThinF' / '_thinF' / 'thin_original'.

    'C100P61ThinF_IMG_..._cell_165.png' -> 'C100P61', 'C1_thinF_...' -> 'C1',
    'C3thin_original_...' -> 'C3'; '' when the name has no such prefix.
    """
    match = _SLIDE_ID.match(os.path.basename(file_name))
    return match.group(1) if match else ""


def list_folder(root: str) -> dict:
    """Finds `Parasitized/` and `Uninfected/` folders at any depth below `root`.

    Returns a dict of name-sorted arrays: paths, names (relative, '/'-separated), labels,
    slide_ids, and `duplicates`: files ignored because a shallower class folder already holds
    a file of that name (the Kaggle copy nests `cell_images/` inside itself).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"config.data.dir={root!r} is not a directory. Point it at the extracted NIH "
            "cell_images.zip (the folder holding Parasitized/ and Uninfected/), or use "
            "--config.data.source=synthetic."
        )
    class_dirs = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        label = CLASS_FOLDERS.get(os.path.basename(dirpath).lower())
        if label is not None and dirpath != root:
            class_dirs.append((os.path.relpath(dirpath, root).count(os.sep), dirpath, label))
    found = {label for _, _, label in class_dirs}
    missing = [name.capitalize() for name, label in CLASS_FOLDERS.items() if label not in found]
    if missing:
        raise FileNotFoundError(
            f"No {' or '.join(m + '/' for m in missing)} folder found below {root!r}. The folder "
            "source expects the NIH/Kaggle layout .../Parasitized/*.png and .../Uninfected/*.png "
            "(at any depth); point config.data.dir at the extracted cell_images.zip, or use "
            "--config.data.source=synthetic."
        )
    seen, rows, duplicates = set(), [], 0
    for _, dirpath, label in sorted(class_dirs):
        for file_name in sorted(os.listdir(dirpath)):
            path = os.path.join(dirpath, file_name)
            if not file_name.lower().endswith(IMAGE_SUFFIXES) or not os.path.isfile(path):
                continue
            if (label, file_name) in seen:
                duplicates += 1
                continue
            seen.add((label, file_name))
            rows.append((os.path.relpath(path, root).replace(os.sep, "/"), path, label))
    if not rows:
        raise ValueError(
            f"The Parasitized/ and Uninfected/ folders below {root!r} hold no images "
            f"({', '.join(IMAGE_SUFFIXES)}). Point config.data.dir at the extracted "
            "cell_images.zip, or use --config.data.source=synthetic."
        )
    rows.sort()
    names = np.array([r[0] for r in rows])
    return {
        "names": names,
        "paths": [r[1] for r in rows],
        "labels": np.array([r[2] for r in rows], np.int32),
        "slide_ids": np.array([slide_id(n) for n in names]),
        "duplicates": duplicates,
    }


def _decode_folder(root: str, config, desc: str):
    listing = list_folder(root)
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
    return split, skipped, listing["duplicates"]


def _load_folder(config, seed: int) -> Dataset:
    pool, skipped, duplicates = _decode_folder(config.dir, config, "decoding " + config.dir)
    fractions = tuple(config.split_fractions)
    extra = {"dir": config.dir, "duplicates_ignored": duplicates}
    check_fractions = fractions
    if config.test_dir:
        test, test_skipped, test_duplicates = _decode_folder(
            config.test_dir, config, "decoding " + config.test_dir
        )
        # The test fraction is unused: train and validation share all of config.data.dir.
        fractions = (
            fractions[0] / (fractions[0] + fractions[1]),
            fractions[1] / (fractions[0] + fractions[1]),
            0.0,
        )
        check_fractions = (*fractions[:2], 1.0)
        skipped = skipped + [dict(s, name="test_dir:" + s["name"]) for s in test_skipped]
        extra.update(test_dir=config.test_dir, test_duplicates_ignored=test_duplicates)
    parts = split_indices(pool.labels, pool.slide_ids, fractions, config.split_by, seed)
    splits = take_splits(pool, parts)
    if config.test_dir:
        splits["test"] = Split(
            test.images,
            test.labels,
            test.slide_ids,
            np.array(["test_dir:" + n for n in test.names]),
        )
    return _checked(splits, check_fractions, config, seed, "folder", skipped, extra)


def _load_synthetic(config, seed: int) -> Dataset:
    images, labels, slides = synthetic.draw_cells(
        config.synthetic_size, config.image_size, config.num_slides, seed
    )
    names = np.array([f"synthetic:{i:06d}" for i in range(len(labels))])
    fractions = tuple(config.split_fractions)
    parts = split_indices(labels, slides, fractions, config.split_by, seed)
    splits = take_splits(Split(images, labels, slides, names), parts)
    extra = {"synthetic_size": config.synthetic_size, "num_slides": config.num_slides}
    return _checked(splits, fractions, config, seed, "synthetic", [], extra)


def _checked(splits, check_fractions, config, seed, source, skipped, extra) -> Dataset:
    """`checked_dataset` of a folder or synthetic split by `config.split_by`."""
    return checked_dataset(
        splits,
        check_fractions,
        f"split by {config.split_by}",
        source=source,
        seed=seed,
        image_size=config.image_size,
        split_by=config.split_by,
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
