"""The experiment commands' command line: absl flags, the config file and its overrides.

`define_config_flag` defines a command's `--config=FILE.py[:ARG]`, and `parse_command_line` is
its flag parser (`app.run(main, flags_parser=parse_command_line)`): a config file that cannot
load, an unknown `--config.` key (with the nearest field) or a value of the wrong type ends the
command with one line, `error: ...`, and exit code 2, as a `mnres.config.ConfigError` does
(`exit_with_error`). `--help` prints the command's docstring, its flags and every config field.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import flags

from mnres.config import ConfigError, leaves


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
        for key, value in sorted(leaves(config)):
            print(f"  {name}.{key} = {value!r}")
    sys.exit(0)


def exit_with_error(error) -> NoReturn:
    """Prints `error: <one line>` to stderr and exits with code 2 (a usage error)."""
    line = " ".join(str(error).split("\n"))
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


# What a training command reports in one line (`exit_with_failure`): a refused folder or
# recipe, a failed write (a full disk), a stopped run. Anything else is a bug: a traceback.
FAILURES = (FloatingPointError, RuntimeError, ImportError, OSError, ValueError)


def exit_with_failure(error: BaseException) -> NoReturn:
    """Ends a command on one of `FAILURES`: `error: <one line>`; exit 2 for a ConfigError (a
    field that cannot work), else 1. An OSError names its file and the system's reason."""
    if isinstance(error, ConfigError):
        exit_with_error(error)
    text = str(error)
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror if error.filename is None else f"{error.filename}: {error.strerror}"
    sys.exit("error: " + " ".join(text.split()))


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


def _unknown_key_message(config, parents, part: str, key: str) -> str:
    block = config
    for parent in parents:
        block = block[parent]
    prefix = ".".join(["config", *parents])
    if not isinstance(block, ml_collections.ConfigDict):
        return f"{prefix} is a value, not a block of fields."
    everywhere = sorted(path for path, _ in leaves(config))
    # The same name elsewhere first (image_size -> data.image_size), then the nearest spelling.
    same_leaf = [p for p in everywhere if p.rsplit(".", 1)[-1] == part]
    close = same_leaf or difflib.get_close_matches(key, everywhere, n=1)
    hint = f"did you mean --config.{close[0]}? " if close else ""
    fields = ", ".join(sorted(block.keys()))
    return f"{prefix} has no field {part!r}; {hint}{prefix} has {fields}."
