"""The crops a command names: image files, folders and glob patterns, found and read.

`find_images` turns what a user typed into files, in order; an input that gives none is
refused with one line that names it (`nothing_found`). `read_crop` decodes a file as training
decodes it (`mnres.data.decode.decode_image`: RGB, longer side to the model's size, centred on
black) when the model's size is known, so a checkpoint and its exports see the same pixels.
A crop under `MIN_CROP_SIDE` pixels on a side is refused as unreadable; `printable` is how a
file name (whatever bytes it holds) is shown on a terminal.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image

from mnres.data import decode
from mnres.data.folders import IMAGE_SUFFIXES

# A crop smaller than this on either side holds no cell to classify (upscaled, it gets a
# confident answer all the same); it is refused as unreadable.
MIN_CROP_SIDE = 8
# Pillow modes of one channel: converted to RGB, which the model (trained on stains) never saw.
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def find_images(inputs) -> list[str]:
    """Image files from paths, folders (searched recursively) and glob patterns, in order.

    A named file is kept whatever its suffix, and each file once, at its first position, however
    it is reached (`predict d ./d`, a link, a glob through a folder that links to itself): files
    are compared by their real path. An input that gives no image (a missing path, a
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
    unique = {}
    for path in found:
        unique.setdefault(os.path.realpath(path) if os.path.isfile(path) else path, path)
    return list(unique.values())


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


def read_crop(path: str, size: int | None) -> tuple[np.ndarray, bool]:
    """(uint8 RGB [S, S, 3] as training decodes a file, whether the file was grayscale); at its
    own size when `size` is None.

    Raises:
      ValueError: a crop under `MIN_CROP_SIDE` pixels on a side.
      OSError (or whatever Pillow raises): a file that is not a readable image.
    """
    with Image.open(path) as image:  # the header only: size and mode
        width, height = image.size
        gray = image.mode in GRAY_MODES
        if min(width, height) < MIN_CROP_SIDE:
            raise ValueError(
                f"a crop of {width}x{height} pixels; crops need at least {MIN_CROP_SIDE} on each "
                "side"
            )
        if size is None:
            image.load()
            return np.asarray(decode.to_rgb(image), np.uint8), gray
    return decode.decode_image(path, size), gray


def read_crops(paths, size: int, what: str) -> np.ndarray:
    """uint8 [N, S, S, 3] of crops a user named for `what` (e.g. '--calibration-dir cells/').

    Raises:
      ValueError: one line naming the first file that cannot be read (or is too small).
    """
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        try:
            images[i] = read_crop(path, size)[0]
        except Exception as e:  # noqa: BLE001 - any unreadable file: one line that names it
            raise ValueError(
                f"{what}: cannot read {printable(path)} as a crop ({reason(e)}); remove it or "
                "give another folder"
            ) from e
    return images


def reason(error: BaseException) -> str:
    """Why a file could not be read, in one printable line."""
    text = str(error).splitlines()[0] if str(error).strip() else ""
    return printable(f"{type(error).__name__}: {text}" if text else type(error).__name__)


def printable(text: str) -> str:
    """`text` as a terminal may show it: control characters (escape codes, newlines) and bytes
    that are not UTF-8 are written as Python escapes, so a file name cannot drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr: shown after a second of work, never when `enabled` is False or
    stderr is not a terminal (a log, a pipe, CI)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, delay=1.0,
                dynamic_ncols=True, leave=False)  # fmt: skip
