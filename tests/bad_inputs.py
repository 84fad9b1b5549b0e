"""The harness of the bad-input tables (tests/test_bad_inputs_*.py): one row, one bad input.

A command row runs `python -m ARGV` in a fresh temporary working folder with a fresh HOME (and
cache), as a user would; a library row calls a function in this process, with HOME and the
working folder moved to temporary ones. Each row asserts what a user is owed:

- the exit code (a command) or the exception type (a library call);
- exactly one line of error output matching the row's pattern (a command's stderr, past lines
  that only warn), and no traceback anywhere;
- nothing in HOME or the working folder changed beyond the paths the row names (a snapshot of
  every file's bytes, and of every link and folder, before and after), and in HOME the
  compilation cache a command that compiled keeps (`mnres.cache`, ~/.cache/mnres/jax-compile).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: a command (`argv`) or a library call (`call`), and what it must give."""

    name: str
    line: str  # a regex the one error line (or the exception's message) must match
    argv: tuple[str, ...] | None = None  # `python -m` arguments; paths relative to the work folder
    call: Callable[[Path], object] | None = None  # a library call, given the work folder
    setup: Callable[[Path], None] | None = None  # prepares the work folder (HOME is empty)
    exit_code: int = 2
    raises: type[BaseException] = ValueError
    may_change: tuple[str, ...] = ()  # paths (relative to the work folder) that may change
    timeout: float = 180.0

    def __str__(self) -> str:
        return self.name


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file's sha256, every link's target and every folder, under `roots`."""
    found = {}
    for root in roots:
        for folder, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                path = os.path.join(folder, name)
                key = os.path.relpath(path, root.parent)
                if os.path.islink(path):
                    found[key] = "link -> " + os.readlink(path)
                elif os.path.isdir(path):
                    found[key] = "dir"
                elif os.path.isfile(path):
                    with open(path, "rb") as f:
                        found[key] = hashlib.sha256(f.read()).hexdigest()
                else:
                    found[key] = "other"
    return found


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


_COMPILE_CACHE = os.path.join("home", ".cache", "mnres", "jax-compile")


def _allowed(path: str, may_change: tuple[str, ...]) -> bool:
    parents = {os.path.join("home", ".cache"), os.path.join("home", ".cache", "mnres")}
    if path in parents or path == _COMPILE_CACHE or path.startswith(_COMPILE_CACHE + os.sep):
        return True  # the cache folder, its parents, the programs in it
    rel = path.split(os.sep, 1)[1] if path.startswith("work" + os.sep) else None
    return rel is not None and any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in
                                   may_change)  # fmt: skip


def check(case: Case, tmp_path: Path, monkeypatch) -> None:
    """Runs `case` and asserts the exit code or exception, the one line, and the snapshot."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    if case.setup is not None:
        case.setup(work)
    before = snapshot(home, work)
    if case.argv is not None:
        _check_command(case, home, work)
    else:
        _check_call(case, home, work, monkeypatch)
    changed = {
        p for p in _changed(before, snapshot(home, work)) if not _allowed(p, case.may_change)
    }
    assert not changed, f"{case.name}: changed {sorted(changed)}"


def _environment(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNRES_", "XDG_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONPATH=str(REPO))
    env.update(TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    return env


def _check_command(case: Case, home: Path, work: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *case.argv],
        cwd=work,
        env=_environment(home),
        capture_output=True,
        text=True,
        timeout=case.timeout,
        stdin=subprocess.DEVNULL,
    )
    said = f"{case.name}: exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}"
    said += f"\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == case.exit_code, said
    assert "Traceback" not in proc.stdout + proc.stderr, said
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, said
    assert re.search(case.line, lines[0]), said


def _error_lines(stderr: str) -> list[str]:
    """stderr less what only warns (absl's W and I lines, `warning:` lines) and argparse's usage
    block (`usage:` and its indented continuation lines), which precede its `error:` line."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        in_usage = line.startswith("usage:") or (in_usage and line.startswith(" "))
        if line.strip() and not in_usage and not re.match(r"(warning:|[WI]\d{4} |WARNING:)", line):
            lines.append(line)
    return lines


def _check_call(case: Case, home: Path, work: Path, monkeypatch) -> None:
    for key in [k for k in os.environ if k.startswith(("MNRES_", "XDG_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.chdir(work)
    try:
        case.call(work)
    except case.raises as e:
        message = str(e)
        assert len(message.strip().splitlines()) == 1, f"{case.name}: {message!r}"
        assert re.search(case.line, message), f"{case.name}: {message!r}"
    else:
        raise AssertionError(f"{case.name}: no {case.raises.__name__} raised")
