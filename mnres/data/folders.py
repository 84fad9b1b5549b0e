"""The folder source's two layouts: the NIH/Kaggle `Parasitized/` + `Uninfected/` folders, and
one subfolder per class (torchvision's ImageFolder, keras' `image_dataset_from_directory`).

`list_folder(root)` finds the labelled images below `root`; `slide_id` reads the NIH slide
(patient) id from a file name, `crop_facts` a crop's slide id and true class from its path.
"""

import os
import re
from typing import NamedTuple

import numpy as np

from mnres.config.schema import MALARIA_CLASSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CLASS_FOLDERS = {"parasitized": 1, "uninfected": 0}  # folder name (any case) -> label.
_SLIDE_ID = re.compile(r"^(.+?)_?thin", re.IGNORECASE)


def slide_id(file_name: str) -> str:
    """NIH slide id: the file-name prefix before 'ThinF' / '_thinF' / 'thin_original'.

    'C100P61ThinF_IMG_..._cell_165.png' -> 'C100P61', 'C1_thinF_...' -> 'C1',
    'C3thin_original_...' -> 'C3'; '' when the name has no such prefix.
    """
    match = _SLIDE_ID.match(os.path.basename(file_name))
    return match.group(1) if match else ""


class CropFacts(NamedTuple):
    """What a crop's path says about it: its slide and its true class."""

    slide_id: str  # the NIH slide (patient) id; '' when the file name carries none
    label: int | None  # 1 = parasitized, 0 = uninfected; None: not in a class folder


def crop_facts(path) -> CropFacts:
    """The slide id and true class of a crop, read from its path as the folder source reads them.

    The slide id is the NIH file-name prefix (`slide_id`); the class is that of the folder
    holding the file, `Parasitized/` or `Uninfected/` in any case (`CLASS_FOLDERS`).
    'cell_images/Parasitized/C100P61ThinF_IMG_20150918_144104_cell_165.png' -> ('C100P61', 1),
    'cells/crop_7.png' -> ('', None).
    """
    folder = os.path.basename(os.path.dirname(path))
    return CropFacts(slide_id(path), CLASS_FOLDERS.get(folder.lower()))


def list_folder(root: str, class_names=None) -> dict:
    """The labelled images below `root`, in one of two layouts.

    - NIH/Kaggle: `Parasitized/` and `Uninfected/` folders at any depth hold every image below
      `root`; labels 0 = uninfected, 1 = parasitized. Files whose name a shallower class folder
      already holds are ignored (the Kaggle copy nests `cell_images/` inside itself).
    - ImageFolder (torchvision's, keras' `image_dataset_from_directory`): otherwise each
      immediate subfolder of `root` is a class (but hidden ones, '.*' and '__*', such as
      `.ipynb_checkpoints` and `__MACOSX`) holding images at any depth below it; classes are
      sorted by name (or in the order of `class_names`) and a label is the class's index.

    Args:
      root: the folder to read (`config.data.dir`).
      class_names: None, or the classes the data must have, in label order
        (`config.data.class_names`).

    Returns:
      A dict of name-sorted arrays: paths, names (relative, '/'-separated), labels, slide_ids;
      `duplicates` (files ignored), `class_names` (label order) and `layout` ('nih' or
      'imagefolder').
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"config.data.dir={root!r} is not a directory. Point it at the extracted NIH "
            "cell_images.zip (the folder holding Parasitized/ and Uninfected/) or at a folder "
            "with one subfolder per class, or use --config.data.source=synthetic."
        )
    class_dirs, outside, with_images = _scan(root)
    if class_dirs and not outside:
        listing = _list_nih(root, class_dirs)
        if class_names is not None and tuple(class_names) != MALARIA_CLASSES:
            raise ValueError(
                f"config.data.class_names={tuple(class_names)!r}, but {root!r} has the NIH "
                "layout (Parasitized/ and Uninfected/), whose classes are "
                f"{MALARIA_CLASSES}: leave config.data.class_names unset."
            )
        return listing
    if any(depth for depth, _, _ in class_dirs):
        nested = sorted({os.path.relpath(d, root) for depth, d, _ in class_dirs if depth})
        raise ValueError(
            f"{root!r} holds Parasitized/ or Uninfected/ folders below its top level "
            f"({', '.join(nested[:3])}) and images outside them (in {', '.join(sorted(outside))}/)"
            ": point config.data.dir at the folder that holds the class folders themselves, "
            "one subfolder per class."
        )
    folders = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not _hidden(d)
    )
    empty = [d + "/" for d in folders if d not in with_images]
    if empty and len(folders) > 1:
        raise ValueError(
            f"Below {root!r}, each subfolder is a class, and {', '.join(empty)} holds no images "
            f"({', '.join(IMAGE_SUFFIXES)}): add images or remove it."
        )
    return _list_image_folder(root, folders, class_names)


def _scan(root: str) -> tuple[list, set, set]:
    """The NIH class folders below `root` as (depth, path, label), the top-level folders with
    images outside any class folder, and the top-level folders with images at all."""
    class_dirs, outside, with_images = [], set(), set()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        if dirpath == root:
            continue
        parts = os.path.relpath(dirpath, root).split(os.sep)
        label = CLASS_FOLDERS.get(parts[-1].lower())
        if label is not None:
            class_dirs.append((len(parts) - 1, dirpath, label))
        if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files) and not _hidden(parts[0]):
            with_images.add(parts[0])
            if not any(p.lower() in CLASS_FOLDERS for p in parts):
                outside.add(parts[0])
    return class_dirs, outside, with_images


def _hidden(folder: str) -> bool:
    """Folders that are no class: '.ipynb_checkpoints', '__MACOSX', ..."""
    return folder.startswith((".", "__"))


def _list_nih(root: str, class_dirs) -> dict:
    """The NIH/Kaggle layout: `class_dirs` are (depth, path, label) of its class folders."""
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
    return _listing(rows, duplicates, MALARIA_CLASSES, "nih")


def _list_image_folder(root: str, folders: list[str], class_names) -> dict:
    """The ImageFolder layout: `folders` are the class subfolders of `root`, each with images."""
    layout = (
        "the folder source reads one subfolder per class (ImageFolder layout: "
        f"{root}/CLASS_A/*.png, {root}/CLASS_B/*.png, ...) or the NIH Parasitized/ + "
        "Uninfected/ layout"
    )
    if class_names is not None:
        if set(class_names) != set(folders):
            raise ValueError(
                f"config.data.class_names={tuple(class_names)!r}, but the class folders below "
                f"{root!r} are {tuple(folders)!r}: name exactly those folders, or leave "
                "config.data.class_names unset to take them all, sorted by name."
            )
        folders = list(class_names)
    if len(folders) < 2:
        found = f"one class folder ({folders[0]}/)" if folders else "no class folder"
        raise ValueError(
            f"Found {found} below {root!r}: a classifier needs at least 2 classes; {layout}."
        )
    rows = []
    for label, folder in enumerate(folders):
        for dirpath, dirnames, files in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            for file_name in sorted(files):
                path = os.path.join(dirpath, file_name)
                if file_name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path):
                    rows.append((os.path.relpath(path, root).replace(os.sep, "/"), path, label))
    return _listing(rows, 0, tuple(folders), "imagefolder")


def _listing(rows, duplicates: int, class_names, layout: str) -> dict:
    rows.sort()
    names = np.array([r[0] for r in rows])
    return {
        "names": names,
        "paths": [r[1] for r in rows],
        "labels": np.array([r[2] for r in rows], np.int32),
        "slide_ids": np.array([slide_id(n) for n in names]),
        "duplicates": duplicates,
        "class_names": tuple(class_names),
        "layout": layout,
    }
