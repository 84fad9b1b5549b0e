"""The experiment config: every field, its default and its kind, written once; and `validate`.

`default_config()` is the complete config (the recommended recipe, experiments/configs/default.py
runs it as is); the experiment configs are overrides of it, and a run's config.json, whatever
mnres version wrote it, reads as overrides of it (`from_overrides`). Each field has one kind
(`FIELD_KINDS`): *recipe* (changes the model or the data it learns from), *execution* (where
the data lie, threads, checkpointing, logging: the same run whatever their values) or
*evaluation* (how the trained network is evaluated); the recipe search compares runs on their
recipe fields.

Every refusal is a `ConfigError` whose message names the field, the value and what is allowed;
the experiment commands print it as `error: <line>` and exit with code 2. The checks run as
early as what they need allows:

- `validate(config)`: every field, without devices, data or building the model (the commands
  call it first; `mnres.training.loop.train_and_evaluate` calls it for library callers).
- `validate_devices(config)`: the batch sizes over `jax.device_count()`, and a config sized for
  another platform (`config.platform`). Only the commands call it: the library can still lower
  a TPU config from a CPU.
- `check_train_split(config, ds)`: the batch size against the loaded training split.
"""

from __future__ import annotations

import difflib
import math
import os

import jax
import ml_collections
from ml_collections import config_dict

from mnres.models import mobilenet, stain
from mnres.models.params import PARAMETER_FREE_FIELDS
from mnres.training import optim, tensorboard

RECIPE, EXECUTION, EVALUATION = "recipe", "execution", "evaluation"
KINDS = (RECIPE, EXECUTION, EVALUATION)
SOURCES = ("tfds", "folder", "synthetic")
SPLIT_BY = ("slide", "image", "auto")
SPLIT_NAMES = ("train", "validation", "test")
# The malaria labels: index = label, 1 = parasitized (the positive class).
MALARIA_CLASSES = ("uninfected", "parasitized")
EVAL_CHECKPOINTS = ("best", "last")
PLATFORMS = ("cpu", "gpu", "tpu")
_POSITIVE_INTS = ("batch_size", "eval_batch_size", "num_epochs")


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


def validate(config) -> None:
    """Checks every field of an experiment config, without devices, data or building the model.

    Args:
      config: the experiment ConfigDict (`default_config()` with overrides).

    Raises:
      ConfigError: for the first field that cannot work.
    """
    _check_block(config, default_config(), "config", None, open_block=True)
    for field in _POSITIVE_INTS:
        _check_positive_int(config, field)
    smoothing = config.label_smoothing
    if not _is_number(smoothing) or not 0 <= smoothing < 1:
        raise ConfigError(f"config.label_smoothing={smoothing!r} must be in [0, 1), e.g. 0.1.")
    q = config.generalized_ce_q
    if not _is_number(q) or not 0 <= q <= 1:
        raise ConfigError(
            f"config.generalized_ce_q={q!r} must be in [0, 1] (0: the cross-entropy), e.g. 0.7."
        )
    for field in ("mixup_alpha", "cutmix_alpha"):
        alpha = config[field]
        if not _is_number(alpha) or alpha < 0:
            raise ConfigError(f"config.{field}={alpha!r} must be >= 0 (0: off), e.g. 0.2.")
    ema = config.ema_decay
    if ema is not None and (not _is_number(ema) or not 0 < ema < 1):
        raise ConfigError(
            f"config.ema_decay={ema!r} must be in (0, 1), e.g. 0.999, or None for no average."
        )
    if config.eval_checkpoint not in EVAL_CHECKPOINTS:
        raise ConfigError(
            f"config.eval_checkpoint={config.eval_checkpoint!r} is not a checkpoint: use 'best' "
            "(by validation accuracy) or 'last'."
        )
    if config.platform is not None and config.platform not in PLATFORMS:
        raise ConfigError(
            f"config.platform={config.platform!r} is not a JAX platform: use one of "
            f"{', '.join(PLATFORMS)}, or None."
        )
    _check_tensorboard(config.tensorboard)
    size = config.data.image_size
    if isinstance(size, int) and size < mobilenet.MIN_IMAGE_SIZE:  # check_data allows >= 8
        raise ConfigError(
            f"config.data.image_size={size} is smaller than MobileNets allow: their five "
            f"stride-2 stages need >= {mobilenet.MIN_IMAGE_SIZE} px."
        )
    _check_block(config.data, default_config().data, "config.data", check_data)
    _check_block(config.optimizer, default_config().optimizer, "config.optimizer", optim.check)
    _check_model(config.model)


def validate_devices(config) -> None:
    """The checks that need this machine: call after `initialize_distributed`.

    Raises:
      ConfigError: a batch size that does not split over the devices, or a config sized for
        another platform (`config.platform`) than this machine's JAX backend.
    """
    platform, backend = config.platform, jax.default_backend()
    if platform is not None and platform != backend:
        raise ConfigError(
            f"config.platform={platform!r} but this machine's JAX backend is {backend!r}: run "
            f"this config where JAX finds a {platform.upper()}, or pass "
            f"--config.platform={backend} to run it here anyway."
        )
    for field in ("batch_size", "eval_batch_size"):
        try:
            check_batch_size(config[field], f"config.{field}")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_batch_size(batch_size: int, what: str = "config.batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices (and processes)."""
    n = jax.device_count()
    if batch_size < 1 or batch_size % n:
        raise ValueError(
            f"{what}={batch_size} must be a positive multiple of the {n} devices "
            f"(jax.device_count()) so that every device gets the same number of examples; "
            f"e.g. --{what}={max(n, (batch_size // n) * n or n)}."
        )


def check_train_split(config, ds) -> None:
    """Raises ConfigError when `config.batch_size` exceeds the training split `ds.train`.

    An epoch is the full batches of the split: a batch larger than it would train zero steps.
    """
    n = len(ds.train)
    if n == 0:
        raise ConfigError(
            "the training split is empty: config.data.split_fractions must give it images, "
            "e.g. (0.8, 0.1, 0.1)."
        )
    if config.batch_size > n:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is more than the {n} images of the training "
            f"split, so no step would train: use at most {n}, e.g. "
            f"--config.batch_size={1 << max(0, n.bit_length() - 1)}."
        )


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


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(config, field: str) -> None:
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.{field}={value!r} must be an integer >= 1.")


def _check_tensorboard(board) -> None:
    if not isinstance(board, bool):
        raise ConfigError(f"config.tensorboard={board!r} must be True or False.")
    if board:
        try:
            tensorboard.check_installed()
        except ImportError as e:
            raise ConfigError(str(e)) from None


def _check_block(block, defaults, prefix: str, check, open_block: bool = False) -> None:
    """Unknown (unless `open_block`) and missing fields of a block, then the block's `check`."""
    if not open_block:
        for key in block.keys():
            if key not in defaults:
                raise ConfigError(_unknown_field(prefix, key, list(defaults.keys())))
    missing = [key for key in defaults.keys() if key not in block]
    if missing:
        raise ConfigError(
            f"{prefix}.{missing[0]} is missing: an experiment config starts from "
            "mnres.config.default_config(), which has every field."
        )
    if check is not None:
        try:
            check(block)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _unknown_field(prefix: str, key: str, fields) -> str:
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f"did you mean {prefix}.{close[0]}? " if close else ""
    return f"{prefix}.{key} is not a field: {hint}{prefix} has {', '.join(sorted(fields))}."


# -- the model, checked from its fields: validation builds no model ---------------------------


def _check_model(model_config) -> None:
    """The model's name, fields, numbers, freeze point and pretrained weights."""
    _check_block(model_config, _model_block(), "config.model", None, open_block=True)
    name = model_config.name
    if name not in mobilenet.MODELS:
        close = difflib.get_close_matches(str(name), list(mobilenet.MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"config.model.name={name!r} is not a model{hint}: use one of "
            f"{', '.join(sorted(mobilenet.MODELS))}."
        )
    cls, fields = _model_fields(model_config)
    momentum = model_config.bn_momentum
    if momentum is not None and (not _is_number(momentum) or not 0 < momentum < 1):
        raise ConfigError(
            f"config.model.bn_momentum={momentum!r} must be in (0, 1), e.g. 0.99 "
            "(None: picked from the number of training steps)."
        )
    alpha, dropout = model_config.alpha, model_config.dropout
    if not _is_number(alpha) or alpha <= 0:
        raise ConfigError(f"config.model.alpha={alpha!r} must be a width multiplier > 0.")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"config.model.dropout={dropout!r} must be in [0, 1).")
    through, layers = model_config.freeze_through, cls.names_of(_Fields(fields))
    if through is not None and through not in layers:
        close = difflib.get_close_matches(str(through), layers, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"config.model.freeze_through={through!r} is not a layer of {name}{hint}: use one of "
            f"its layers {layers[0]} ... {layers[-1]} (python -m mnres summary {name}), or None."
        )
    _check_pretrained(model_config, cls, fields)


class _Fields:
    """A model's fields as attributes, for the class's `names_of` without building the model."""

    def __init__(self, fields: dict):
        self.__dict__.update(fields)


def _model_fields(model_config) -> tuple[type, dict]:
    """The model's class and every field it would get from `mnres.models.from_config`, refused
    where `from_config` would refuse them (unknown fields, dtype, input normalisation)."""
    given = {k: v for k, v in model_config.items() if k not in ("name", "pretrained", "dtype")}
    cls, fields = mobilenet.model_fields(model_config.name)
    unknown = sorted(set(given) - set(fields) - {"parent"})
    if unknown:
        raise ConfigError(
            f"config.model: model {model_config.name!r} has no field(s) {unknown}; its fields "
            f"are {', '.join(sorted(set(fields) - {'parent', 'name'}))}."
        )
    if model_config.dtype not in mobilenet.DTYPES:
        raise ConfigError(
            f"config.model.dtype={model_config.dtype!r}; use one of {', '.join(mobilenet.DTYPES)}"
        )
    try:
        stain.check_method(model_config.input_normalization)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    return cls, {**fields, **given}


def _check_pretrained(model_config, cls, fields: dict) -> None:
    """'malaria' (the shipped weights: the same network), 'imagenet' or a Keras `.h5` file."""
    from mnres.weights import shipped

    pretrained, name = model_config.pretrained, model_config.name
    if pretrained in shipped.SHIPPED:
        _check_shipped(pretrained, shipped.shipped_config(pretrained).model, cls, fields)
    elif pretrained == "imagenet":  # Keras' published file, downloaded at the start of training
        from mnres.weights import imagenet as imagenet_weights

        try:
            imagenet_weights.choose_weights(name, model_config.alpha)
        except ValueError as e:
            raise ConfigError(
                f"config.model.pretrained='imagenet' does not fit config.model.name={name!r}: "
                f"{e}; give a Keras weights file (.h5) instead, or leave it unset."
            ) from None
        if fields.get("depth_multiplier", 1) != 1:
            raise ConfigError(
                "config.model.pretrained='imagenet' needs config.model.depth_multiplier=1 "
                "(Keras publishes no other)."
            )
    elif pretrained and not os.path.isfile(pretrained):
        raise ConfigError(
            f"config.model.pretrained={pretrained!r} does not exist: give 'imagenet' (Keras' "
            "published ImageNet weights, downloaded once), 'malaria' (the model shipped with "
            "mnres) or a Keras weights file (.h5), or leave it unset to train from scratch."
        )


def _check_shipped(pretrained: str, shipped_model, cls, fields: dict) -> None:
    """The network of the shipped weights, or of one member of a shipped ensemble: the fields
    that shape the parameters (`PARAMETER_FREE_FIELDS` aside) as the config's."""
    ensemble = shipped_model.name == "ensemble"
    members = shipped_model.members if ensemble else [shipped_model]
    found = []
    for index, member in enumerate(members):
        what = (
            f"member {index} of the shipped {pretrained!r} ensemble"
            if ensemble
            else f"config.model.pretrained={pretrained!r}: the shipped weights"
        )
        their_cls, theirs = _model_fields(from_overrides({"model": dict(member)}).model)
        if their_cls is not cls:
            found.append(f"{what} are for a {their_cls.__name__}; this model is a {cls.__name__}")
            continue
        differ = [
            f"{key}={_plain(theirs[key])!r} (this model has {_plain(fields[key])!r})"
            for key in theirs
            if key not in PARAMETER_FREE_FIELDS | {"num_classes"}
            and _plain(fields[key]) != _plain(theirs[key])
        ]
        if not differ:
            return
        found.append(f"{what} need {'; '.join(differ)}")
    raise ConfigError(
        f"{'; '.join(found)}: set those config.model fields, or use 'imagenet' or a Keras "
        "weights file (.h5)."
    )


def _plain(value):
    """A field's value as a JSON config gives it back (tuples as lists compare equal)."""
    return tuple(value) if isinstance(value, list) else value
