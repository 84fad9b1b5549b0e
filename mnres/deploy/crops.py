"""The crops a command names: image files, folders and glob patterns, found and read.

`find_images` turns what a user typed into files, in order; an input that gives none is
refused with one line that names it (`nothing_found`). `read_crop` decodes a file as training
decodes it (`mnres.data.decode.decode_image`: RGB, longer side to the model's size, centred on
black) when the model's size is known, so a checkpoint and its exports see the same pixels.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image

from mnres.data import decode
from mnres.data.folders import IMAGE_SUFFIXES


def find_images(inputs) -> list[str]:
    """Image files from paths, folders (searched recursively) and glob patterns, in order.

    A named file is kept whatever its suffix. An input that gives no image (a missing path, a
    pattern that matches nothing, a folder without images) is kept as it is when others give
    some: `predict_files` reports it in its row and predicts the rest.

    Raises:
      ValueError: no input gives any file; one line naming each input and what was expected.
    """
    found, empty = [], []
    for item in inputs:
        files = files_of(item)
        found += files or [item]
        if not files:
            empty.append(item)
    if len(found) == len(empty):  # not one file among them
        problems = "; ".join(nothing_found(item) for item in empty) or "no input given"
        raise ValueError(
            f"{problems} (looked for {', '.join(IMAGE_SUFFIXES)} files; give image files, "
            "folders or glob patterns)"
        )
    return list(dict.fromkeys(found))  # each file once, first position kept


def files_of(item: str) -> list[str]:
    """The files an input names: itself, a folder's images (recursively) or a glob's images."""
    if os.path.isdir(item):
        found = []
        for dirpath, dirnames, files in os.walk(item):
            dirnames.sort()
            found += [
                os.path.join(dirpath, f)
                for f in sorted(files)
                if f.lower().endswith(IMAGE_SUFFIXES)
            ]
        return found
    if os.path.isfile(item):
        return [item]
    matches = [m for m in sorted(glob.glob(item, recursive=True)) if os.path.isfile(m)]
    return [m for m in matches if m.lower().endswith(IMAGE_SUFFIXES)]


def nothing_found(item: str) -> str:
    """Why an input gives no image, in a few words that name it."""
    if os.path.isdir(item):
        if not os.access(item, os.R_OK | os.X_OK):
            return f"cannot read the folder {item} (permission denied)"
        return f"no images found in {item}"
    if glob.has_magic(item):
        return f"no image files match {item}"
    return f"{item} does not exist"


def read_crop(path: str, size: int | None) -> np.ndarray:
    """uint8 RGB [S, S, 3] as training decodes a file; at its own size when `size` is None."""
    if size is not None:
        return decode.decode_image(path, size)
    with Image.open(path) as image:
        image.load()
        return np.asarray(decode.to_rgb(image), np.uint8)
