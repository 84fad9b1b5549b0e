"""The cross-validation pool decoded once and packed to travel to another machine.

`python -m experiments.fold_outputs pack` writes it, `run` unpacks it (checked against the
packed sha256) and its training processes load it: every crop of the folder source, decoded by
mnres.data's own code as `python -m experiments.crossval` decodes it, in xz-compressed chunks.
"""

from __future__ import annotations

import ast
import hashlib
import json
import lzma
import os
from concurrent import futures

import numpy as np

FOLD_SEED = 0  # experiments.crossval's: the config's seed
_CHUNKS = 8
_XZ_FILTERS = [
    {"id": lzma.FILTER_DELTA, "dist": 3},  # RGB: each byte minus the same channel's neighbour
    {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME},
]


def folder_config(data_dir: str, overrides: dict):
    """experiments/configs/default.py on the folder source, with `--set FIELD=VALUE` overrides.

    A value reads as a Python literal where it is one (`3`, `True`, `(0.9, 0.1, 0.0)`), else as
    the string; ml_collections checks it against the field (a typo or a wrong type raises).
    """
    from experiments.configs import default

    config = default.get_config()
    config.data.source = "folder"
    config.data.dir = data_dir
    config.progress_bar = False
    config.lock()  # an unknown field raises instead of being added
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: _literal(value)})
        except (KeyError, TypeError) as e:
            message = str(e.args[0]).split(" Other fields present")[0]
            raise ValueError(f"--set {key}={value}: {message}") from None
    config.unlock()
    return config


def _literal(value):
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a string field's value: gray_world


def _compress(chunk: np.ndarray) -> bytes:
    return lzma.compress(chunk.tobytes(), format=lzma.FORMAT_XZ, filters=_XZ_FILTERS)


def pack(data_dir: str, pool_dir: str) -> None:
    """Writes POOL/pool.json, POOL/meta.npz and POOL/images_NN.xz (uint8 [N, S, S, 3])."""
    from mnres.data import folds as folds_lib

    config = folder_config(data_dir, {})
    pool, manifest = folds_lib.load_pool(config.data, FOLD_SEED)
    os.makedirs(pool_dir, exist_ok=True)
    np.savez_compressed(
        os.path.join(pool_dir, "meta.npz"),
        labels=pool.labels, slide_ids=pool.slide_ids, names=pool.names,
    )  # fmt: skip
    bounds = np.linspace(0, len(pool), _CHUNKS + 1).astype(int)
    chunks = [pool.images[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    with futures.ThreadPoolExecutor() as ex:  # lzma lets go of the GIL
        for i, blob in enumerate(ex.map(_compress, chunks)):
            with open(os.path.join(pool_dir, f"images_{i:02d}.xz"), "wb") as f:
                f.write(blob)
    info = {
        "shape": list(pool.images.shape),
        "images_sha256": hashlib.sha256(pool.images.tobytes()).hexdigest(),
        "chunks": [f"images_{i:02d}.xz" for i in range(_CHUNKS)],
        "skipped": manifest.get("skipped", []),
        "data_dir": "PATH/" + os.path.basename(os.path.normpath(data_dir)),
    }
    with open(os.path.join(pool_dir, "pool.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"packed {len(pool)} crops into {pool_dir}", flush=True)


def _decompress(path: str) -> bytes:
    with open(path, "rb") as f:
        return lzma.decompress(f.read())


def unpack(pool_dir: str, npy_path: str) -> None:
    """POOL's chunks -> one .npy of the images, checked against the packed sha256."""
    with open(os.path.join(pool_dir, "pool.json")) as f:
        info = json.load(f)
    with futures.ThreadPoolExecutor() as ex:  # lzma lets go of the GIL
        raw = b"".join(ex.map(_decompress, [os.path.join(pool_dir, c) for c in info["chunks"]]))
    if hashlib.sha256(raw).hexdigest() != info["images_sha256"]:
        raise ValueError(f"{pool_dir}: the unpacked images are not the packed ones")
    images = np.frombuffer(raw, np.uint8).reshape(info["shape"])
    np.save(npy_path, images)


def load_pool(pool_dir: str, npy_path: str):
    """The pool `folds.load_pool` gives, from the packed arrays, and its manifest."""
    from mnres.data.splits import Split

    with open(os.path.join(pool_dir, "pool.json")) as f:
        info = json.load(f)
    meta = np.load(os.path.join(pool_dir, "meta.npz"))
    images = np.load(npy_path)
    pool = Split(images, meta["labels"], meta["slide_ids"], meta["names"])
    return pool, {"skipped": info["skipped"]}, info
