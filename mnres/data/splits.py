"""Train/validation/test splits by slide (patient) or by image, and the split manifest."""

import dataclasses
import hashlib
import json
import os

import numpy as np

from mnres.config.schema import MALARIA_CLASSES, SPLIT_NAMES


@dataclasses.dataclass(frozen=True)
class Split:
    """Decoded examples of one split, in a fixed order."""

    images: np.ndarray  # uint8 [N, S, S, 3], resized to config.image_size, decoded once.
    labels: np.ndarray  # int32 [N], the class index (malaria: 1 = parasitized, 0 = uninfected).
    slide_ids: np.ndarray  # str [N], '' where unknown (tfds).
    names: np.ndarray  # str [N], stable example ids (relative file path, 'tfds:train:123').

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "Split":
        """The examples at `idx` (integer indices), in that order."""
        idx = np.asarray(idx, np.int64)
        return Split(self.images[idx], self.labels[idx], self.slide_ids[idx], self.names[idx])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The three splits and the manifest that proves which examples they hold."""

    train: Split
    validation: Split
    test: Split
    manifest: dict  # JSON-able; see `build_manifest`.
    # Label = index: the malaria pair, or the class folders of an ImageFolder layout.
    class_names: tuple[str, ...] = MALARIA_CLASSES


def class_names_of(dataset) -> tuple[str, ...]:
    """A dataset's classes in label order; the malaria pair for a `Dataset`-like object that
    names none (a library caller's own)."""
    return tuple(getattr(dataset, "class_names", MALARIA_CLASSES))


def names_sha256(names) -> str:
    """sha256 of the ordered example ids, one per line."""
    return hashlib.sha256("\n".join(str(n) for n in names).encode("utf-8")).hexdigest()


def resolve_split_by(split_by: str, slide_ids) -> str:
    """'slide' or 'image': `split_by`, with 'auto' read as 'slide' iff some slide id is known."""
    if split_by != "auto":
        return split_by
    return "slide" if any(str(s) for s in slide_ids) else "image"


def num_classes_of(labels) -> int:
    """The classes labels index: at least 2, else one more than the largest label."""
    labels = np.asarray(labels)
    return max(2, int(labels.max()) + 1) if len(labels) else 2


def split_indices(labels, slide_ids, fractions, split_by: str, seed: int) -> list[np.ndarray]:
    """Sorted index arrays, one per fraction: whole slides (`split_by='slide'`) or cells ('image').

    Args:
      labels: int [N], class indices (malaria: 1 = parasitized).
      slide_ids: str [N]; used by 'slide' only ('' = a cell without a slide is its own group).
      fractions: the share of cells each part gets (any number of parts, e.g. k folds).
      split_by: 'slide' (`split_by_slide`) or 'image' (`split_by_image`).
      seed: the parts are a function of it.

    Returns:
      One int64 index array per entry of `fractions`; together they hold every index once.
    """
    if split_by == "slide":
        return split_by_slide(labels, slide_ids, fractions, seed)
    if split_by == "image":
        return split_by_image(labels, fractions, seed)
    raise ValueError(f"split_by must be 'slide' or 'image', got {split_by!r}")


def take_splits(pool: Split, parts) -> dict:
    """{'train', 'validation', 'test'}: the examples of `pool` at each of the three `parts`."""
    return {name: pool.take(idx) for name, idx in zip(SPLIT_NAMES, parts, strict=True)}


def checked_dataset(
    splits: dict, check_fractions, how: str, class_names=MALARIA_CLASSES, **manifest_fields
) -> Dataset:
    """The `Dataset` of `splits`, after `check_classes`, with its manifest.

    Args:
      splits: {'train', 'validation', 'test'} -> `Split`.
      check_fractions: per split; a split with fraction 0 may be empty (see `check_classes`).
      how: how the splits were made, for the error message (e.g. 'split by slide').
      class_names: the name of each label, in label order (default: the malaria pair).
      **manifest_fields: the keyword arguments of `build_manifest` (source, seed, ...).

    Returns:
      The `Dataset`; raises ValueError if a split that should hold examples lacks a class, or a
      label has no name.
    """
    class_names = tuple(class_names)
    for name, split in splits.items():
        if len(split) and int(np.max(split.labels)) >= len(class_names):
            raise ValueError(
                f"The {name} split has labels up to {int(np.max(split.labels))}, but the data "
                f"names {len(class_names)} classes ({', '.join(class_names)}): only the training "
                "command (experiments.malaria) takes data of other classes."
            )
    check_classes(splits, check_fractions, how, class_names)
    manifest = build_manifest(splits, class_names=class_names, **manifest_fields)
    return Dataset(**splits, manifest=manifest, class_names=class_names)


def split_by_image(labels, fractions, seed: int) -> list[np.ndarray]:
    """Per-class shuffled cut by `fractions`; returns sorted index arrays (train, val, test)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x1A6E])
    parts = [[] for _ in fractions]
    for label in range(num_classes_of(labels)):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        bounds = np.cumsum([0, *_counts(len(idx), fractions)])
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _counts(n: int, fractions) -> list[int]:
    """Largest-remainder rounding of n * fractions; each non-empty split gets >= 1 if n allows."""
    exact = np.asarray(fractions, np.float64) * n
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    for k in np.flatnonzero((np.asarray(fractions) > 0) & (counts == 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    return counts.tolist()


def split_by_slide(labels, slide_ids, fractions, seed: int) -> list[np.ndarray]:
    """Assigns whole slides to splits; returns sorted index arrays (train, val, test).

    Slides are stratified: with two classes, slides with at least one cell of class 1
    (infected patients) and the others are placed separately; with more, slides are grouped
    by their majority class (the lowest label of a tie). Within a stratum, slides are taken in a
    random order (from `seed`) and each goes to the split that most lacks cells of the
    classes it holds, relative to `fractions`; of `_TRIALS` such orders the one whose
    per-class counts come closest to `fractions` wins. No slide is in two splits. A cell
    without a slide id is its own group.
    """
    labels = np.asarray(labels)
    groups = np.asarray([s if s else f"\0{i}" for i, s in enumerate(slide_ids)])
    uniq, inverse = np.unique(groups, return_inverse=True)
    classes = num_classes_of(labels)
    per_class = np.stack(
        [np.bincount(inverse[labels == c], minlength=len(uniq)) for c in range(classes)], -1
    ).astype(np.float64)  # [slides, classes]
    if classes == 2:
        stratum_of, strata = per_class[:, 1] > 0, (True, False)  # infected patients first
    else:
        stratum_of = np.argmax(per_class, -1)
        strata = np.unique(stratum_of)
    rng = np.random.default_rng([seed, 0x511DE])
    fractions = np.asarray(fractions, np.float64)
    split_of_group = np.full(len(uniq), -1)
    for stratum in strata:
        members = np.flatnonzero(stratum_of == stratum)
        best = None
        for _ in range(_TRIALS):
            order = members[rng.permutation(len(members))]
            assignment, error = _place_slides(per_class[order], fractions)
            if best is None or error < best[0] - 1e-12:
                best = (error, order, assignment)
        split_of_group[best[1]] = best[2]
    example_split = split_of_group[inverse]
    return [np.flatnonzero(example_split == k) for k in range(len(fractions))]


_TRIALS = 64


def _place_slides(per_class, fractions):
    """Greedy placement of slides (rows: cells per class) in the given order."""
    totals = np.maximum(per_class.sum(0), 1)
    target = fractions[:, None] * per_class.sum(0) / totals  # [splits, classes], as shares.
    filled = np.zeros_like(target)
    assignment = np.zeros(len(per_class), np.int64)
    for i, cells in enumerate(per_class / totals):
        score = ((target - filled) * cells).sum(-1)
        # Ties break towards the earlier split (train); empty splits (fraction 0) never win.
        k = int(np.argmax(np.where(fractions > 0, score, -np.inf)))
        assignment[i] = k
        filled[k] += cells
    return assignment, float(np.abs(filled - target).sum())


def check_classes(splits: dict, fractions, how: str, class_names=MALARIA_CLASSES) -> None:
    """Raises ValueError if a split that should hold examples lacks a class."""
    unit = "cells" if tuple(class_names) == MALARIA_CLASSES else "images"
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=True):
        split = splits[name]
        if fraction <= 0 and len(split) == 0:
            continue
        missing = [n for c, n in enumerate(class_names) if not np.any(split.labels == c)]
        if missing:
            by_slide = "slide" in how
            raise ValueError(
                f"The {name} split ({how}) has no {' or '.join(missing)} {unit}: there are too "
                f"few {'slides' if by_slide else unit} for these split fractions. Use more "
                "data, larger fractions for the small splits"
                f"{', or --config.data.split_by=image' if by_slide else ''}."
            )


def build_manifest(
    splits: dict,
    *,
    source: str,
    seed: int,
    image_size: int,
    split_by: str,
    skipped: list,
    extra: dict | None = None,
    class_names=MALARIA_CLASSES,
) -> dict:
    """JSON-able description of a dataset split.

    Per split: counts per class, sorted slide ids, and the sha256 of the ordered example ids
    (equal hashes = the same examples in the same order). Also the files skipped as unreadable,
    and which slides (if any) appear in more than one split. Classes other than the malaria
    pair are listed under `class_names` (label = index); the malaria pair is implied.
    """
    class_names = tuple(class_names)
    manifest = {
        "source": source,
        "seed": int(seed),
        "image_size": int(image_size),
        "split_by": split_by,
        "label_convention": "1 = parasitized (positive class), 0 = uninfected; TFDS malaria "
        "uses 0 = parasitized and is mapped to 1.",
        "splits": {},
    }
    if class_names != MALARIA_CLASSES:
        manifest["class_names"] = list(class_names)
        manifest["label_convention"] = (
            "label = index into class_names: the class folders, sorted by name (the ImageFolder "
            "order of torchvision and keras) unless config.data.class_names orders them"
        )
    slides_of = {}
    for name in SPLIT_NAMES:
        split = splits[name]
        labels = np.asarray(split.labels)
        slides = sorted({str(s) for s in split.slide_ids if s})
        slides_of[name] = set(slides)
        manifest["splits"][name] = {
            "num_examples": int(len(labels)),
            "counts": {c: int(np.sum(labels == i)) for i, c in enumerate(class_names)},
            "num_slides": len(slides),
            "slide_ids": slides,
            "names_sha256": names_sha256(split.names),
        }
    shared = set()
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1 :]:
            shared |= slides_of[a] & slides_of[b]
    manifest["slides_in_several_splits"] = sorted(shared)
    manifest["num_skipped"] = len(skipped)
    manifest["skipped"] = [dict(s) for s in skipped]
    manifest.update(extra or {})
    return manifest


def write_manifest(dataset: Dataset, path) -> None:
    """Writes `dataset.manifest` as JSON to `path` (a file, or a dir: manifest.json, the name a
    training run gives it), in the run folder's JSON format (`mnres.run_folder.write_json`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dataset.manifest, f, indent=2, sort_keys=True)
        f.write("\n")
