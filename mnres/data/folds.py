"""Cross-validation folds of a data set: every cell given to one of k folds, by slide (patient)
or by image, and the train / validation / test splits of each fold's run.

Infected and uninfected patients are placed separately (the stratification of
`mnres.data.splits.split_by_slide`, which also balances cells per class), so every fold holds
both kinds of patients and no patient is in two folds. Fold k is the test split of run k; the
other folds are cut by slide into train and validation. A fold's run folder keeps
`fold_spec.json`, from which its splits are rebuilt (`dataset_for_run`).
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from mnres import run_folder
from mnres.data import sources
from mnres.data.splits import Dataset, Split, checked_dataset, split_indices, take_splits

FOLD_SPEC_JSON = "fold_spec.json"


def load_pool(data_config, seed: int) -> tuple[Split, dict]:
    """Every cell of `data_config`'s source as one split, and that load's manifest."""
    pool_config = data_config.copy_and_resolve_references()
    with pool_config.unlocked():
        pool_config.split_fractions = (1.0, 0.0, 0.0)
        pool_config.split_seed = None  # `seed` (the fold spec's) cuts the folds
        if pool_config.test_dir:
            logging.warning(
                "Cross-validation ignores config.data.test_dir=%s.", data_config.test_dir
            )
            pool_config.test_dir = None
    ds = sources.load_dataset(pool_config, seed)
    return ds.train, ds.manifest


def assign_folds(labels, slide_ids, num_folds: int, seed: int, split_by: str = "slide"):
    """Fold index (int64 [N]) of every cell: by slide, stratified by patient, or by image."""
    if num_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {num_folds}")
    if split_by == "slide" and not all(slide_ids):
        raise ValueError(
            "Patient-level folds need a slide id for every cell; this source has none "
            "(TFDS malaria). Use the folder source (--config.data.source=folder "
            "--config.data.dir=PATH/cell_images), or image-level folds only "
            "(experiments.crossval --nopatient_level)."
        )
    parts = split_indices(labels, slide_ids, [1.0 / num_folds] * num_folds, split_by, seed)
    folds = np.full(len(labels), -1, np.int64)
    for k, idx in enumerate(parts):
        folds[idx] = k
    empty = [k for k in range(num_folds) if not np.any(folds == k)]
    if empty:
        raise ValueError(
            f"folds {empty} are empty: {len(set(slide_ids))} slides are too few for "
            f"{num_folds} folds; use fewer folds"
        )
    return folds


def fold_dataset(pool: Split, folds, fold: int, spec: dict, pool_manifest=None) -> Dataset:
    """Run `fold`'s splits: test = that fold; the others cut into train and validation.

    Args:
      pool: every cell (`load_pool`).
      folds: `assign_folds` of the pool.
      fold: which fold is the test split.
      spec: {num_folds, split_by, validation_fraction, seed, source, image_size}.
      pool_manifest: the pool's manifest, for its list of skipped files.

    Returns:
      The fold's `Dataset`, its manifest with the spec under 'crossval'.
    """
    rest = np.flatnonzero(folds != fold)
    fractions = (1.0 - spec["validation_fraction"], spec["validation_fraction"])
    train_part, val_part = split_indices(
        pool.labels[rest], pool.slide_ids[rest], fractions, spec["split_by"], spec["seed"]
    )
    parts = (rest[train_part], rest[val_part], np.flatnonzero(folds == fold))
    how = f"cross-validation fold {fold} of {spec['num_folds']}, split by {spec['split_by']}"
    return checked_dataset(
        take_splits(pool, parts),
        (1.0, 1.0, 1.0),
        how,
        source=spec["source"],
        seed=spec["seed"],
        image_size=spec["image_size"],
        split_by=spec["split_by"],
        skipped=(pool_manifest or {}).get("skipped", []),
        extra={"crossval": dict(spec, fold=fold)},
    )


def fold_spec(config, num_folds: int, split_by: str, fold_seed: int | None = None) -> dict:
    """What decides the folds: {num_folds, split_by, validation_fraction, seed, source,
    image_size} (each fold's fold_spec.json adds its index).

    `seed` cuts the folds and their validation slides: `fold_seed`, else
    config.data.split_seed, else config.seed. A run with another config.seed on the same folds
    (a fold seed kept) trains other weights on the same slides, e.g. the members of a per-fold
    ensemble.

    Raises:
      ValueError: `fold_seed` and config.data.split_seed both given, and different.
    """
    split_seed = config.data.get("split_seed")
    if fold_seed is not None and split_seed is not None and fold_seed != split_seed:
        raise ValueError(
            f"fold seed {fold_seed} and config.data.split_seed={split_seed} disagree: give one "
            "(both name the seed that cuts the folds)"
        )
    seed = next(s for s in (fold_seed, split_seed, config.seed) if s is not None)
    train_fraction, val_fraction, _ = tuple(config.data.split_fractions)
    return {
        "num_folds": int(num_folds),
        "split_by": split_by,
        "validation_fraction": float(val_fraction / (train_fraction + val_fraction)),
        "seed": int(seed),
        "source": config.data.source,
        "image_size": int(config.data.image_size),
    }


def dataset_for_run(workdir: str, config) -> Dataset:
    """The splits a run trained on: its cross-validation fold if it is one, else config.data's."""
    path = os.path.join(workdir, FOLD_SPEC_JSON)
    if not os.path.isfile(path):
        return sources.load_dataset(config.data, config.seed)
    spec = run_folder.read_json(path)
    pool, manifest = load_pool(config.data, spec["seed"])
    folds = assign_folds(pool.labels, pool.slide_ids, spec["num_folds"], spec["seed"],
                         spec["split_by"])  # fmt: skip
    return fold_dataset(pool, folds, spec["fold"], spec, manifest)
