"""`validate`: a config checked before any work, every refusal one line.

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

from mnres.config.schema import (
    EVAL_CHECKPOINTS,
    PLATFORMS,
    ConfigError,
    check_data,
    default_config,
    from_overrides,
)
from mnres.models import build, mobilenet, stain
from mnres.models.params import PARAMETER_FREE_FIELDS
from mnres.training import optim, tensorboard

_POSITIVE_INTS = ("batch_size", "eval_batch_size", "num_epochs")


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
    _check_distill(config.distill)
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


def _check_distill(distill) -> None:
    _check_block(distill, default_config().distill, "config.distill", None)
    teacher = distill.teacher
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        raise ConfigError(
            f"config.distill.teacher={teacher!r} must be a run folder (several joined by ','), "
            "or None for no distillation."
        )
    weight, temperature = distill.weight, distill.temperature
    if not _is_number(weight) or not 0 <= weight <= 1:
        raise ConfigError(
            f"config.distill.weight={weight!r} must be in [0, 1] (the soft loss's share), e.g. 0.5."
        )
    if not _is_number(temperature) or not temperature > 0:
        raise ConfigError(f"config.distill.temperature={temperature!r} must be > 0, e.g. 1.0.")


def validate_devices(config) -> None:
    """The checks that need the host it runs on: call after `initialize_distributed`.

    Raises:
      ConfigError: a batch size that does not split over the devices, or a config sized for
        another platform (`config.platform`) than the JAX backend of the process.
    """
    platform, backend = config.platform, jax.default_backend()
    if platform is not None and platform != backend:
        raise ConfigError(
            f"config.platform={platform!r} but this process's JAX backend is {backend!r}: run "
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
    """Raises ConfigError when the training split `ds.train` is empty or smaller than
    `config.batch_size`, or when the run keeps neither a validation nor a test split.

    An epoch is the full batches of the split: a batch larger than it would train zero steps.
    A final run keeps only a validation split (it chooses the checkpoint and fits the
    calibration); a run with neither would be trained and never measured.
    """
    n = len(ds.train)
    if n == 0:
        raise ConfigError(
            "the training split is empty: config.data.split_fractions must give it images, "
            "e.g. (0.8, 0.1, 0.1)."
        )
    if not (len(ds.validation) or len(ds.test)):
        raise ConfigError(
            "the validation and test splits are both empty "
            f"(config.data.split_fractions={tuple(config.data.split_fractions)}): nothing would "
            "choose the checkpoint or measure the model. Keep a validation split, e.g. "
            "--config.data.split_fractions='(0.9, 0.1, 0.0)' for a final run whose held-out "
            "figures come from cross-validation of its recipe."
        )
    if config.batch_size > n:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is more than the {n} images of the training "
            f"split, so no step would train: use at most {n}, e.g. "
            f"--config.batch_size={1 << max(0, n.bit_length() - 1)}."
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
    _check_block(model_config, default_config().model, "config.model", None, open_block=True)
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
    cls, fields = build.model_fields(model_config.name)
    unknown = sorted(set(given) - set(fields) - {"parent"})
    if unknown:
        raise ConfigError(
            f"config.model: model {model_config.name!r} has no field(s) {unknown}; its fields "
            f"are {', '.join(sorted(set(fields) - {'parent', 'name'}))}."
        )
    if model_config.dtype not in build.DTYPES:
        raise ConfigError(
            f"config.model.dtype={model_config.dtype!r}; use one of {', '.join(build.DTYPES)}"
        )
    try:
        stain.check_method(model_config.input_normalization)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    return cls, {**fields, **given}


def _check_pretrained(model_config, cls, fields: dict) -> None:
    """'malaria' (the shipped weights: the same network), 'imagenet' or a Keras `.h5` file."""
    from mnres.weights import imagenet, registry, shipped  # the registry reads run folders

    pretrained, name = model_config.pretrained, model_config.name
    if pretrained in registry.names("shipped"):
        _check_shipped(pretrained, shipped.shipped_config(pretrained).model, cls, fields)
    elif pretrained == "imagenet":  # Keras' published file, downloaded at the start of training
        try:
            registry.imagenet_entry(name, model_config.alpha, imagenet.DEFAULT_SIZE)
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
