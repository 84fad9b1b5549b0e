"""Real cell crops shipped with mnres, to try a model with no data set at hand.

  mnres.data.sample_cells()               # paths of every bundled crop
  python -m mnres predict --sample        # the shipped model on them

About 250 crops of the NIH thin-blood-smear set (Parasitized/ and Uninfected/ folders, NIH
file names kept, so slide ids and labels are read as for the full set), chosen from the shipped
model's training slides: a demo, not a test set. Source and licence: sample_cells/SOURCE.md.

`calibration_images` draws the training crops a run keeps for int8 export.
"""

from __future__ import annotations

import importlib.resources
import pathlib

import numpy as np

from mnres.data.folders import CLASS_FOLDERS, IMAGE_SUFFIXES

SAMPLE_FOLDER = "sample_cells"


def sample_folder() -> pathlib.Path:
    """The folder of bundled crops (`Parasitized/`, `Uninfected/`, `SOURCE.md`).

    Raises:
      FileNotFoundError: the package was installed without its data files.
    """
    folder = importlib.resources.files("mnres.data") / SAMPLE_FOLDER
    if not isinstance(folder, pathlib.Path) or not folder.is_dir():
        raise FileNotFoundError(
            f"the bundled sample crops are missing ({folder}): reinstall mnres from a wheel or "
            "a full clone (pip install --force-reinstall mnres)"
        )
    return folder


def sample_cells(label: str | None = None) -> list[str]:
    """Paths of the bundled crops, sorted by class folder then name.

    Args:
      label: None for every crop, or 'parasitized' / 'uninfected' for one class.
    """
    if label is not None and label.lower() not in CLASS_FOLDERS:
        raise ValueError(f"label {label!r}: use 'parasitized', 'uninfected' or None")
    folder = sample_folder()
    paths = [
        p
        for name in sorted(CLASS_FOLDERS)  # parasitized, then uninfected
        if label is None or label.lower() == name
        for p in sorted((folder / name.capitalize()).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not paths:
        raise FileNotFoundError(f"no crops in {folder}: reinstall mnres")
    return [str(p) for p in paths]


def sample_labels(paths) -> list[int]:
    """Labels (1 = parasitized) of bundled crops, from their class folder."""
    return [CLASS_FOLDERS[pathlib.Path(p).parent.name.lower()] for p in paths]


def calibration_images(train, count: int = 256, seed: int = 0) -> np.ndarray:
    """`count` random crops of a training split (uint8 [count, S, S, 3])."""
    rng = np.random.default_rng(seed)
    return train.images[rng.permutation(len(train))[:count]]
