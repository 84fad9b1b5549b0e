"""The experiment config's schema: every field, its default and its kind, written once.

`default_config()` is the complete config (the recommended recipe, experiments/configs/default.py
runs it as is); the experiment configs are overrides of it, and a run's config.json, whatever
mnres version wrote it, reads as overrides of it (`from_overrides`). Each field has one kind
(`FIELD_KINDS`): *recipe* (changes the model or the data it learns from), *execution* (where
the data lie, threads, checkpointing, logging: the same run whatever their values) or
*evaluation* (how the trained network is evaluated); the recipe search compares runs on their
recipe fields. `check_data` is the data block's own check, which the data sources run too.

The library's modules import this module, not the `mnres.config` package, whose validation
reads the weights registry (which reads run folders, which read configs).
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

RECIPE, EXECUTION, EVALUATION = "recipe", "execution", "evaluation"
KINDS = (RECIPE, EXECUTION, EVALUATION)
SOURCES = ("tfds", "folder", "synthetic")
SPLIT_BY = ("slide", "image", "auto")
SPLIT_NAMES = ("train", "validation", "test")
# The malaria labels: index = label, 1 = parasitized (the positive class).
MALARIA_CLASSES = ("uninfected", "parasitized")
EVAL_CHECKPOINTS = ("best", "last")
PLATFORMS = ("cpu", "gpu", "tpu")


class ConfigError(ValueError):
    """A config field that cannot work; the message is one line: field, value, what is allowed."""


def default_config() -> ml_collections.ConfigDict:
    """The complete experiment config, every field at its default: MobileNetV2 alpha 0.35 at
    64 px, 20 epochs on TFDS `malaria` (experiments/configs/default.py says why)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # the weights, the batch order and the splits
    c.model = _model_block()
    c.data = _data_block()
    c.optimizer = _optimizer_block()
    c.label_smoothing = 0.0
    # > 0: train on the generalized cross-entropy (mnres.training.optim.cross_entropy), which a
    # mislabelled crop pulls less; 0 is the cross-entropy.
    c.generalized_ce_q = 0.0
    # Mixup / CutMix Beta parameters (mnres.data.augment.mix); 0 is off.
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0
    # Learn a trained teacher's soft outputs too (mnres.training.distill); off without a teacher.
    c.distill = _distill_block()
    # Evaluate (and export) a moving average of the weights with this decay; None: the weights.
    c.ema_decay = config_dict.placeholder(float)
    # Final evaluation (and export) averages the logits over the 8 symmetries of each crop: it
    # raised validation AUC on all five models of the search, for 8x the inference cost.
    c.test_time_augmentation = True
    c.batch_size = 64  # a multiple of 8, so it shards over 1, 2, 4 or 8 devices
    c.eval_batch_size = 256
    c.num_epochs = 20
    # Where the steps run ('cpu', 'gpu', 'tpu'): the commands refuse a config sized for another
    # JAX backend, and the model's conv formulation is chosen for it. None: any.
    c.platform = config_dict.placeholder(str)
    # CPU: glibc keeps freed memory for reuse (mnres.host_memory), so XLA's steps stop
    # page-faulting their buffers in: faster training, for a higher peak memory.
    c.keep_freed_memory = True
    c.log_every_steps = 50  # how often losses are fetched to the host and checked for NaN
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 2
    c.async_checkpointing = True
    c.eval_checkpoint = "best"  # 'best' (by validation accuracy) or 'last'
    c.progress_bar = True  # shown only on a terminal
    # TensorBoard event files in WORKDIR/tensorboard/ (per-step loss, learning rate, images/s;
    # validation per epoch), written without TensorFlow: needs pip install 'mnres[tensorboard]'.
    c.tensorboard = False
    # Several processes (TPU pod slice, GPU hosts): see docs/training.md, "Several hosts".
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = config_dict.placeholder(str)
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    c.distributed.cpu_collectives = config_dict.placeholder(str)  # 'gloo'
    return c


def _model_block() -> ml_collections.ConfigDict:
    """`config.model`: these fields, and any other field of the model's class (`num_blocks`...)."""
    c = ml_collections.ConfigDict()
    c.name = "mobilenet_v2"  # a key of mnres.models.MODELS
    c.alpha = 0.35
    # Unset: the training loop picks it from the run's step count, an averaging window 1/(1-m)
    # of 2% of the run clipped to [0.9, 0.99] (mnres.training.bn_momentum): 0.99 for the full
    # development set's 5,560 steps, 0.9 for malaria-mini's 240. Keras' 0.999 averages over
    # ~1000 steps: after a few epochs the running statistics still describe the first steps'
    # network, and validation sits near chance while training accuracy is high (the seed paper's
    # "99.46% train, 55% validation"); 0.99 on 240 steps gives one output for every crop.
    c.bn_momentum = config_dict.placeholder(float)
    c.dropout = 0.0
    c.dtype = "float32"  # 'bfloat16': bfloat16 compute, float32 params and BatchNorm
    # Keras layer name: it and the layers before it are frozen, if pretrained weights are given.
    c.freeze_through = config_dict.placeholder(str)
    # 'malaria' (the model shipped with mnres), 'imagenet' (Keras' published file, downloaded
    # once into $MNRES_CACHE) or a Keras .h5 path.
    c.pretrained = config_dict.placeholder(str)
    # Per-crop colour normalisation inside the model ('none', 'gray_world', 'per_image'):
    # mnres.models.stain; exports and predict apply it too.
    c.input_normalization = "none"
    return c


def _distill_block() -> ml_collections.ConfigDict:
    """`config.distill`: the teacher and how much its outputs count (mnres.training.distill)."""
    c = ml_collections.ConfigDict()
    # Run folder(s) of trained models, joined by ','; several teach with the mean of their
    # logits. In cross-validation '{fold}' is the fold's number (fold k's teacher trained on
    # fold k's training slides). None: no distillation.
    c.teacher = config_dict.placeholder(str)
    c.weight = 0.5  # the soft loss's share; the labels' cross-entropy has the rest
    c.temperature = 1.0  # both softmaxes are of logits / temperature
    return c


def _data_block() -> ml_collections.ConfigDict:
    """`config.data`: where the cells come from, how they are split, sized and augmented."""
    c = ml_collections.ConfigDict()
    # 'tfds' (TFDS `malaria`), 'folder' (the NIH/Kaggle `Parasitized/` + `Uninfected/` layout,
    # or one subfolder per class of any classes) or 'synthetic' (drawn cells, offline, seconds).
    c.source = "tfds"
    c.dir = config_dict.placeholder(str)  # folder source: searched at any depth.
    c.test_dir = config_dict.placeholder(str)  # folder source: an external test set.
    # None: the data's classes (the folder source's class folders sorted by name; the malaria
    # pair otherwise); else the classes in label order, which the folders must be.
    c.class_names = config_dict.placeholder(tuple)
    # Folder and synthetic sources: 'slide' keeps every slide (patient) in one split; 'image'
    # splits cells independently (slides leak between splits); 'auto': 'slide' when file names
    # carry NIH slide ids, else 'image'. TFDS has no slide ids and splits by image.
    c.split_by = "slide"
    c.split_fractions = (0.8, 0.1, 0.1)  # (train, validation, test), sums to 1.
    # The seed of the splits (and of the synthetic cells); None: config.seed. Keep it while
    # changing config.seed to train other weights on the same split (an ensemble's members).
    c.split_seed = config_dict.placeholder(int)
    # TFDS source: slice strings (e.g. 'train[:80%]'); unset ones come from split_fractions.
    c.tfds_splits = ml_collections.ConfigDict(
        {name: config_dict.placeholder(str) for name in SPLIT_NAMES}
    )
    c.tfds_data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets).
    c.image_size = 64  # every image is padded to a square, then resized to image_size^2.
    c.cache_dir = config_dict.placeholder(str)  # decoded-image cache on disk; None: memory only.
    c.num_workers = 0  # decoding threads; 0: one per CPU core.
    c.synthetic_size = 2000  # synthetic source: number of cells in all splits together.
    c.num_slides = 40  # synthetic source: two thirds infected patients, one third uninfected.
    # Training augmentation (mnres.data.augment), applied per image inside the jitted step.
    c.flip = True  # random horizontal and vertical flips.
    c.rot90 = True  # random 90-degree rotations (with flips: all 8 symmetries of the square).
    c.brightness = 0.05  # max additive brightness change, in [0, 1] pixel units.
    c.contrast = 0.1  # contrast factor drawn from [1 - contrast, 1 + contrast].
    c.saturation = 0.1  # saturation factor drawn from [1 - saturation, 1 + saturation].
    c.hue = 0.02  # max hue rotation, as a fraction of a full turn (stain variation).
    return c


def _optimizer_block() -> ml_collections.ConfigDict:
    """`config.optimizer` (mnres.training.optim): schedule, optimizer, clipping, weight decay."""
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # 'adamw' | 'sgd' (with momentum) | 'rmsprop'
    c.learning_rate = 2e-3  # peak, reached after warmup; scale it with the batch size
    c.warmup_epochs = 1.0
    c.end_learning_rate_factor = 0.0  # cosine decays to learning_rate * this
    c.weight_decay = 1e-2  # decoupled for adamw, L2-like (added to the gradient) otherwise
    c.momentum = 0.9  # sgd and rmsprop
    c.nesterov = False  # sgd
    c.b1 = 0.9  # adamw
    c.b2 = 0.999  # adamw
    c.eps = 1e-8  # adamw; rmsprop uses 1e-3 (Keras-like) when eps is this default
    c.rmsprop_decay = 0.9
    c.grad_clip_norm = 1.0  # global norm over the trainable gradients; 0 disables
    return c


# -- the kinds of the fields -----------------------------------------------------------------

# The fields that are not the recipe's; every other one is. Execution: where the data lie and
# how the run is executed, shown and saved (evaluation batches and the platform included: the
# same network whatever they are). Evaluation: which checkpoint is evaluated, and how.
_NOT_RECIPE = {
    **dict.fromkeys(
        ("data.dir", "data.test_dir", "data.tfds_data_dir", "data.cache_dir", "data.num_workers",
         "eval_batch_size", "platform", "keep_freed_memory", "log_every_steps",
         "checkpoint_every_epochs", "keep_checkpoints", "async_checkpointing", "progress_bar",
         "tensorboard", "distributed.enabled", "distributed.coordinator_address",
         "distributed.num_processes", "distributed.process_id", "distributed.cpu_collectives"),
        EXECUTION,
    ),
    "test_time_augmentation": EVALUATION,
    "eval_checkpoint": EVALUATION,
}  # fmt: skip


def leaves(config, prefix: str = ""):
    """(dotted path, value) of every leaf field of a ConfigDict (or dict), depth first."""
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict | dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# {dotted path: kind} of every field of `default_config()`.
FIELD_KINDS = {path: _NOT_RECIPE.get(path, RECIPE) for path, _ in leaves(default_config())}


def field_kind(path: str) -> str:
    """The kind of a field, by dotted path: RECIPE, EXECUTION or EVALUATION.

    A field outside the schema (a model class's own field such as `model.num_blocks`, an
    ensemble's members) is the recipe's.
    """
    return FIELD_KINDS.get(path, RECIPE)


def fields_of_kind(kind: str) -> frozenset[str]:
    """The dotted paths of the schema's fields of one kind."""
    return frozenset(path for path, k in FIELD_KINDS.items() if k == kind)


def recipe_fields(config) -> dict:
    """{dotted path: value} of the recipe fields of a config (a ConfigDict or a nested dict)."""
    return {path: value for path, value in leaves(config) if field_kind(path) == RECIPE}


def from_overrides(overrides: dict) -> ml_collections.ConfigDict:
    """The schema's default with `overrides` (a nested dict, e.g. a run's config.json) in it.

    A field the overrides lack takes its default (a config.json of mnres 0.1.0 has no
    `mixup_alpha`), a field the schema lacks is kept (a model class's own fields, an ensemble's
    `members`), and the values keep the types the overrides give them. An ensemble's
    `config.model` (name 'ensemble') is its members' and stays as given.
    """

    def merged(default: dict, given: dict) -> dict:
        out = dict(default)
        for key, value in given.items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                is_ensemble = key == "model" and value.get("name") == "ensemble"
                out[key] = value if is_ensemble else merged(default[key], value)
            else:
                out[key] = value
        return out

    return ml_collections.ConfigDict(merged(default_config().to_dict(), overrides))


def class_names(data_config) -> tuple[str, ...]:
    """The class names a data block (or a run's config.json `data`) fixes, in label order.

    Unset (None, as in every malaria config) means the malaria pair.
    """
    names = data_config.class_names
    return tuple(str(n) for n in names) if names else MALARIA_CLASSES


# -- validation --------------------------------------------------------------------------------


def with_class_names(config, names: tuple[str, ...]):
    """`config` with `data.class_names` the data's classes `names`, where they are not the
    malaria pair or the config sets the field; malaria configs stay as they were (unset means
    that pair).

    Raises:
      ConfigError: `config.data.class_names` names other classes than the data's.
    """
    given = config.data.class_names
    if given is not None and tuple(given) != names:
        raise ConfigError(
            f"config.data.class_names={tuple(given)!r}, but the data's classes are {names!r}."
        )
    if names == MALARIA_CLASSES and given is None:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.class_names = names
    return config


def check_data(config) -> None:
    """Raises ValueError, naming the fix, for a `config.data` block that cannot work."""
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
    names = config.class_names
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
    seed = config.get("split_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(
            f"config.data.split_seed={seed!r} must be None (config.seed cuts the splits) or an "
            "integer >= 0, e.g. --config.data.split_seed=0."
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
