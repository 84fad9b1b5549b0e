"""One validation of an experiment config before any work: each bad field is one line.

Every refusal is a `ConfigError` whose message names the field, the value and what is allowed;
the experiment commands print it as `error: <line>` and exit with code 2, without a traceback.
The checks run in three places, as early as what they need allows:

- `validate(config)`: every field, no hardware and no data (the commands call it first;
  `mnres.training.loop.train_and_evaluate` calls it too, for library callers). The blocks keep
  their own checks (`mnres.data.config.check`, `mnres.training.optim.check`,
  `mnres.models.from_config`); this module runs them and adds the fields between blocks.
- `validate_devices(config)`: the batch sizes over `jax.device_count()`, and a config sized for
  another platform (`config.platform`, e.g. 'tpu' in experiments/configs/tpu.py). Only the
  commands call it: the library can still lower a TPU config from a CPU.
- `check_train_split(config, ds)`: the batch size against the loaded training split, before the
  first step (the training loop calls it); `with_class_names(config, ds)` records the data's
  classes in the run's config, refusing a `config.data.class_names` that names others.

`parse_command_line` is the commands' flag parser: unknown `--config.` keys (with the nearest
field) and values of the wrong type become the same one-line errors.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import warnings
from typing import NoReturn

import jax
import ml_collections
from absl import flags

from mnres import data, models, weights
from mnres.data import config as data_config
from mnres.data.splits import class_names_of
from mnres.models import mobilenet
from mnres.training import optim, steps, tensorboard

EVAL_CHECKPOINTS = ("best", "last")
PLATFORMS = ("cpu", "gpu", "tpu")
_POSITIVE_INTS = ("batch_size", "eval_batch_size", "num_epochs")


class ConfigError(ValueError):
    """A config field that cannot work; the message is one line: field, value, what is allowed."""


def validate(config) -> None:
    """Checks every field of an experiment config, without touching devices or data.

    Args:
      config: the experiment ConfigDict (see experiments/configs/default.py).

    Raises:
      ConfigError: for the first field that cannot work.
    """
    for field in _POSITIVE_INTS:
        _check_positive_int(config, field)
    smoothing = config.get("label_smoothing", 0.0)
    if not _is_number(smoothing) or not 0 <= smoothing < 1:
        raise ConfigError(f"config.label_smoothing={smoothing!r} must be in [0, 1), e.g. 0.1.")
    q = config.get("generalized_ce_q", 0.0)
    if not _is_number(q) or not 0 <= q <= 1:
        raise ConfigError(
            f"config.generalized_ce_q={q!r} must be in [0, 1] (0: the cross-entropy), e.g. 0.7."
        )
    for field in ("mixup_alpha", "cutmix_alpha"):
        alpha = config.get(field, 0.0)
        if not _is_number(alpha) or alpha < 0:
            raise ConfigError(f"config.{field}={alpha!r} must be >= 0 (0: off), e.g. 0.2.")
    ema = config.get("ema_decay")
    if ema is not None and (not _is_number(ema) or not 0 < ema < 1):
        raise ConfigError(
            f"config.ema_decay={ema!r} must be in (0, 1), e.g. 0.999, or None for no average."
        )
    which = config.get("eval_checkpoint", "best")
    if which not in EVAL_CHECKPOINTS:
        raise ConfigError(
            f"config.eval_checkpoint={which!r} is not a checkpoint: use 'best' (by validation "
            "accuracy) or 'last'."
        )
    platform = config.get("platform")
    if platform is not None and platform not in PLATFORMS:
        raise ConfigError(
            f"config.platform={platform!r} is not a JAX platform: use one of "
            f"{', '.join(PLATFORMS)}, or None."
        )
    board = config.get("tensorboard", False)
    if not isinstance(board, bool):
        raise ConfigError(f"config.tensorboard={board!r} must be True or False.")
    if board:
        try:
            tensorboard.check_installed()
        except ImportError as e:
            raise ConfigError(str(e)) from None
    size = config.data.get("image_size")
    if isinstance(size, int) and size < mobilenet.MIN_IMAGE_SIZE:  # data.check allows >= 8
        raise ConfigError(
            f"config.data.image_size={size} is smaller than MobileNets allow: their five "
            f"stride-2 stages need >= {mobilenet.MIN_IMAGE_SIZE} px."
        )
    data_fields = data_config.default_config()
    with data_fields.unlocked():  # fields a data block may add (class_names)
        for field in data_config.OPTIONAL_FIELDS:
            data_fields[field] = None
    _check_block(config.data, data_fields, "config.data", data_config.check)
    _check_block(config.optimizer, optim.default_config(), "config.optimizer", optim.check)
    _check_model(config.model)


def validate_devices(config) -> None:
    """The checks that need this machine: call after `initialize_distributed`.

    Raises:
      ConfigError: a batch size that does not split over the devices, or a config sized for
        another platform (`config.platform`) than this machine's JAX backend.
    """
    platform, backend = config.get("platform"), jax.default_backend()
    if platform is not None and platform != backend:
        raise ConfigError(
            f"config.platform={platform!r} but this machine's JAX backend is {backend!r}: run "
            f"this config where JAX finds a {platform.upper()}, or pass "
            f"--config.platform={backend} to run it here anyway."
        )
    for field in ("batch_size", "eval_batch_size"):
        try:
            steps.check_batch_size(config[field], f"config.{field}")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_train_split(config, ds: data.Dataset) -> None:
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
            f"--config.batch_size={_power_of_two_at_most(n)}."
        )


def with_class_names(config, ds: data.Dataset):
    """`config` with `data.class_names` the data's classes, where they are not the malaria pair
    or the config has the field; malaria configs stay as they were (unset means that pair).

    Raises:
      ConfigError: `config.data.class_names` names other classes than the data's.
    """
    names, given = class_names_of(ds), config.data.get("class_names")
    if given is not None and tuple(given) != names:
        raise ConfigError(
            f"config.data.class_names={tuple(given)!r}, but the data's classes are {names!r}."
        )
    if names == data_config.MALARIA_CLASSES and "class_names" not in config.data:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.class_names = names
    return config


def check_override_keys(config, overrides) -> None:
    """Raises ConfigError for the first `--config.KEY=VALUE` whose KEY is not a field of `config`.

    Args:
      config: the loaded config the overrides apply to.
      overrides: {dotted field path: value as typed}, e.g. {'model.alpha': '0.5'}.
    """
    for key, value in overrides.items():
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, list | tuple):
                break  # an element of a tuple field: ml_collections checks its index
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                given = f"--config.{key}" + ("" if value is None else f"={value}")
                raise ConfigError(f"{given}: {_unknown_key_message(config, parts[:i], part, key)}")
            node = node[part]


# -- the blocks and the model ----------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(config, field: str) -> None:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.{field}={value!r} must be an integer >= 1.")


def _power_of_two_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def _check_block(block, defaults, prefix: str, check) -> None:
    """Unknown fields of a block (against its defaults), then the block's own `check`."""
    for key in block.keys():
        if key not in defaults:
            raise ConfigError(_unknown_field(prefix, key, list(defaults.keys())))
    try:
        check(block)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _unknown_field(prefix: str, key: str, fields) -> str:
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f"did you mean {prefix}.{close[0]}? " if close else ""
    return f"{prefix}.{key} is not a field: {hint}{prefix} has {', '.join(sorted(fields))}."


def _unknown_key_message(config, parents, part: str, key: str) -> str:
    block = config
    for parent in parents:
        block = block[parent]
    prefix = ".".join(["config", *parents])
    if not isinstance(block, ml_collections.ConfigDict):
        return f"{prefix} is a value, not a block of fields."
    everywhere = sorted(path for path, _ in _fields(config))
    # The same name elsewhere first (image_size -> data.image_size), then the nearest spelling.
    same_leaf = [p for p in everywhere if p.rsplit(".", 1)[-1] == part]
    close = same_leaf or difflib.get_close_matches(key, everywhere, n=1)
    hint = f"did you mean --config.{close[0]}? " if close else ""
    fields = ", ".join(sorted(block.keys()))
    return f"{prefix} has no field {part!r}; {hint}{prefix} has {fields}."


def _fields(config, prefix: str = ""):
    """(dotted path, value) of every leaf field of a ConfigDict, depth first."""
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_model(model_config) -> None:
    """The model's name, numbers, fields (`from_config`), freeze point and weights file."""
    name = model_config.get("name")
    if name not in models.MODELS:
        close = difflib.get_close_matches(str(name), list(models.MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"config.model.name={name!r} is not a model{hint}: use one of "
            f"{', '.join(sorted(models.MODELS))}."
        )
    _check_model_numbers(model_config)
    model = _model(model_config)
    try:
        model.frozen_layers  # noqa: B018 -- the property checks config.model.freeze_through
    except ValueError:
        through, layers = model_config.freeze_through, model.layer_names()
        close = difflib.get_close_matches(str(through), layers, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"config.model.freeze_through={through!r} is not a layer of {name}{hint}: use one of "
            f"its layers {layers[0]} ... {layers[-1]} (python -m mnres summary {name}), or None."
        ) from None
    try:  # the weights it starts from (config.model.pretrained) fit this network
        weights.check_model_config(model_config, model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_model_numbers(model_config) -> None:
    momentum = model_config.get("bn_momentum")
    if momentum is not None and (not _is_number(momentum) or not 0 < momentum < 1):
        raise ConfigError(
            f"config.model.bn_momentum={momentum!r} must be in (0, 1), e.g. 0.99 "
            "(None: picked from the number of training steps)."
        )
    alpha, dropout = model_config.get("alpha", 1.0), model_config.get("dropout", 0.0)
    if not _is_number(alpha) or alpha <= 0:
        raise ConfigError(f"config.model.alpha={alpha!r} must be a width multiplier > 0.")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"config.model.dropout={dropout!r} must be in [0, 1).")


def _model(model_config):
    """`models.from_config`, its refusals (dtype, unknown fields...) as ConfigErrors."""
    try:
        with warnings.catch_warnings():  # the training loop warns about deprecated names once
            warnings.simplefilter("ignore", DeprecationWarning)
            return models.from_config(model_config)
    except (ValueError, TypeError) as e:
        message = str(e)
        if not message.startswith("config."):
            message = f"config.model: {message}"
        raise ConfigError(message) from None


# -- the command line ------------------------------------------------------------------------

_DEFAULT_CONFIG_FILES: dict[str, str] = {}


def define_config_flag(default: str, name: str = "config") -> None:
    """`config_flags.DEFINE_config_file`, with the default file loaded at parse time.

    ml_collections loads a default config file (and applies the `--config.` overrides) when the
    flag is defined, at import, where no error can be caught; here the default is handed to
    `parse_command_line` instead, which loads it with the overrides.
    """
    from ml_collections import config_flags

    _DEFAULT_CONFIG_FILES[name] = default
    config_flags.DEFINE_config_file(
        name,
        None,
        f"Config file, FILE.py[:ARG]; default: {os.path.relpath(default)}.",
        lock_config=True,
    )


def parse_command_line(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=parse_command_line)`.

    A bad flag or `--config.` override ends the program with one line, `error: ...`, and exit
    code 2: an unknown key names the nearest field, a value of the wrong type the type asked.
    """
    for name, default in _DEFAULT_CONFIG_FILES.items():
        if _config_argument(argv, name) is None:
            argv = [argv[0], f"--{name}={default}", *argv[1:]]
    try:
        configs = {}
        for name in _DEFAULT_CONFIG_FILES:
            config = configs[name] = _load_config_file(name, _config_argument(argv, name))
            if isinstance(config, ml_collections.ConfigDict):
                check_override_keys(config, dict(_overrides(argv, name)))
        if _HELP_FLAGS & set(argv[1:]):
            _print_help(argv, configs)
        return flags.FLAGS(argv)
    except ConfigError as e:
        exit_with_error(e)
    except flags.IllegalFlagValueError as e:
        exit_with_error(_wrong_type_message(argv) or e)
    except flags.Error as e:
        exit_with_error(e)


_HELP_FLAGS = {"-h", "-?", "--help", "--helpshort", "--helpfull"}


def _print_help(argv, configs: dict) -> NoReturn:
    """The command's docstring, its flags and every config field with its value; exit 0.

    absl's own help exits 1 and cannot list the fields of a config file.
    """
    main = sys.modules.get("__main__")
    print((getattr(main, "__doc__", None) or "").strip() + "\n")
    # --helpfull: every flag of every module (absl's own list); otherwise the command's.
    print(flags.FLAGS.get_help() if "--helpfull" in argv else flags.FLAGS.main_module_help())
    for name, config in configs.items():
        if not isinstance(config, ml_collections.ConfigDict):
            continue
        print(f"\nConfig fields of --{name}={_config_argument(argv, name)}, each settable with "
              f"--{name}.FIELD=VALUE:")  # fmt: skip
        for key, value in sorted(_fields(config)):
            print(f"  {name}.{key} = {value!r}")
    sys.exit(0)


def exit_with_error(error) -> NoReturn:
    """Prints `error: <one line>` to stderr and exits with code 2 (a usage error)."""
    line = " ".join(str(error).split("\n"))
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _load_config_file(name: str, argument: str):
    """The config `--NAME=FILE.py[:ARG]` loads; ConfigError (its last line) if it cannot load."""
    try:
        config = flags.FLAGS[name].parser.parse(argument)
        if not isinstance(config, ml_collections.ConfigDict):
            getattr(config, "lock", None)  # ml_collections' stand-in raises its load error here
    except (OSError, TypeError, ValueError) as e:
        last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise ConfigError(f"--{name}={argument}: cannot load the config file: {last}") from None
    return config


def _config_argument(argv, name: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}=") or arg.startswith(f"-{name}="):
            value = arg.split("=", 1)[1]
        elif arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _overrides(argv, name: str) -> list[tuple[str, str | None]]:
    """(dotted key, value as typed) of each `--NAME.KEY=VALUE` (or `--NAME.KEY VALUE`)."""
    found = []
    for i, arg in enumerate(argv):
        match = re.match(rf"-{{1,2}}(no)?{name}\.([^=]+)(=(.*))?$", arg)
        if match:
            value = match.group(4)
            if value is None and not match.group(1) and i + 1 < len(argv):
                value = argv[i + 1]
            found.append((f"{name}.{match.group(2)}", value))
    return [(key.split(".", 1)[1], value) for key, value in found]


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _wrong_type_message(argv) -> str | None:
    """The first override whose value its field's parser refuses, as one line."""
    for name in _DEFAULT_CONFIG_FILES:
        for key, value in _overrides(argv, name):
            flag = flags.FLAGS[f"{name}.{key}"] if f"{name}.{key}" in flags.FLAGS else None
            if flag is None or value is None:
                continue
            try:
                flag.parser.parse(value)
            except (TypeError, ValueError) as e:
                kind = _TYPE_NAMES.get(flag.parser.flag_type())
                wanted = f"takes {kind}" if kind else f"refuses it ({e})"
                return (
                    f"--{name}.{key}={value!r} is not {kind or 'accepted'}: config.{key} {wanted} "
                    f"(the config file sets {flag.default!r})."
                )
    return None
