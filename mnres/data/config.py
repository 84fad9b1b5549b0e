"""The `config.data` block: every field, its default, and the checks that name the fix."""

import math

import ml_collections
from ml_collections import config_dict

SOURCES = ("tfds", "folder", "synthetic")
SPLIT_BY = ("slide", "image", "auto")
SPLIT_NAMES = ("train", "validation", "test")
# The malaria labels: index = label, 1 = parasitized (the positive class).
MALARIA_CLASSES = ("uninfected", "parasitized")
# Fields a data block may hold beyond `default_config()`'s. `class_names` is set by the folder
# source's ImageFolder layout (and by the training loop in config.json) only where the classes
# are not the malaria pair, so malaria configs and their run folders stay as they were.
OPTIONAL_FIELDS = ("class_names",)


def class_names(data_config) -> tuple[str, ...]:
    """The class names a data block (or a run's config.json `data`) fixes, in label order.

    Unset (None, or absent as in every malaria config) means the malaria pair
    `MALARIA_CLASSES`.
    """
    names = data_config.get("class_names") if data_config is not None else None
    return tuple(str(n) for n in names) if names else MALARIA_CLASSES


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` block, with every field and its default.

    Experiment configs start from it: `config.data = mnres.data.default_config()`.
    """
    c = ml_collections.ConfigDict()
    # Where the cells come from: 'tfds' (TFDS `malaria`), 'folder' (the NIH/Kaggle
    # `Parasitized/` + `Uninfected/` layout, or one subfolder per class of any classes) or
    # 'synthetic' (drawn cells, offline, seconds).
    c.source = "tfds"
    c.dir = config_dict.placeholder(str)  # folder source: searched at any depth.
    c.test_dir = config_dict.placeholder(str)  # folder source: an external test set.
    # Folder and synthetic sources: 'slide' keeps every slide (patient) in one split;
    # 'image' splits cells independently (slides leak between splits); 'auto': 'slide' when
    # file names carry NIH slide ids, else 'image'.
    c.split_by = "slide"
    c.split_fractions = (0.8, 0.1, 0.1)  # (train, validation, test), sums to 1.
    # TFDS source: slice strings (e.g. 'train[:80%]'); unset ones come from split_fractions.
    c.tfds_splits = ml_collections.ConfigDict(
        {name: config_dict.placeholder(str) for name in SPLIT_NAMES}
    )
    c.tfds_data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets).
    c.image_size = 64  # every image is padded to a square, then resized to image_size^2.
    c.cache_dir = config_dict.placeholder(str)  # decoded-image cache on disk; None: memory only.
    c.num_workers = 0  # decoding threads; 0: one per CPU core.
    # Synthetic source.
    c.synthetic_size = 2000  # number of cells in all splits together.
    c.num_slides = 40  # fake slides; two thirds infected patients, one third uninfected.
    # Training augmentation (mnres.data.augment), applied per image inside the jitted step.
    c.flip = True  # random horizontal and vertical flips.
    c.rot90 = True  # random 90-degree rotations (with flips: all 8 symmetries of the square).
    c.brightness = 0.05  # max additive brightness change, in [0, 1] pixel units.
    c.contrast = 0.1  # contrast factor drawn from [1 - contrast, 1 + contrast].
    c.saturation = 0.1  # saturation factor drawn from [1 - saturation, 1 + saturation].
    c.hue = 0.02  # max hue rotation, as a fraction of a full turn (stain variation).
    return c


def check(config) -> None:
    """Raises ValueError, naming the fix, for a config that cannot work."""
    if config.source not in SOURCES:
        raise ValueError(
            f"Unknown config.data.source={config.source!r}: use one of {', '.join(SOURCES)} "
            "(e.g. --config.data.source=synthetic to run offline)."
        )
    if config.split_by not in SPLIT_BY:
        raise ValueError(
            f'Unknown config.data.split_by={config.split_by!r}: use "slide" (no patient in two '
            'splits), "image" or "auto" (by slide when file names carry NIH slide ids).'
        )
    names = config.get("class_names")
    if names is not None and (
        isinstance(names, str)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError(
            f"config.data.class_names={names!r} must be None (the names come from the data) "
            "or two or more distinct folder names in label order, e.g. "
            "--config.data.class_names=\"('cat', 'dog')\"."
        )
    if names is not None and config.source != "folder" and class_names(config) != MALARIA_CLASSES:
        raise ValueError(
            f"config.data.class_names={tuple(names)!r}: the {config.source} source has the "
            f"malaria classes {MALARIA_CLASSES}; other classes need --config.data.source=folder."
        )
    fractions = tuple(config.split_fractions)
    if (
        len(fractions) != 3
        or any(not 0 <= f <= 1 for f in fractions)
        or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
    ):
        raise ValueError(
            f"config.data.split_fractions={fractions} must be three fractions "
            "(train, validation, test), each in [0, 1], that add up to 1, e.g. "
            '--config.data.split_fractions="(0.8, 0.1, 0.1)".'
        )
    if fractions[0] <= 0:
        raise ValueError(
            "config.data.split_fractions gives the train split nothing: "
            "make its first entry positive, e.g. (0.8, 0.1, 0.1)."
        )
    if config.image_size < 8:
        raise ValueError(f"config.data.image_size={config.image_size} is too small: use >= 8.")
    if config.source == "folder" and not config.dir:
        raise ValueError(
            'config.data.source="folder" needs config.data.dir: the folder that holds '
            "Parasitized/ and Uninfected/ (e.g. the extracted NIH cell_images.zip), or one "
            "subfolder per class, e.g. --config.data.dir=PATH/cell_images."
        )
