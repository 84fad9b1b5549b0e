"""Who may write into a run folder: only a run (`claim`: the folder is marked as one, never a
folder of a user's files), and one at a time (an exclusive lock on its `.lock` file, freed when
its holder dies). `lock` does both, before anything else is written."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

import jax
from absl import logging

from mnres import run_folder


class WorkdirBusyError(RuntimeError):
    """Another live process holds the run folder's lock (`lock`)."""


class WorkdirLock:
    """An exclusive `fcntl.flock` on `workdir/.lock`, held by process 0 of a run.

    The kernel releases it when the holding process ends in any way (SIGKILL included), so a
    dead run never leaves the folder locked. The file also names the holder (pid, host, start
    time) for the message a second run gets; it is left in place, emptied, on release
    (removing it would let two runs lock two different files of one name).
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, run_folder.LOCK_FILE)
        self._fd: int | None = None
        # acquire() ran (the lock is held, or deliberately not taken: not process 0, no flock).
        self._acquired = False

    def acquire(self) -> WorkdirLock:
        """Takes the lock now or raises `WorkdirBusyError` naming the holder; never waits.

        Processes other than 0 of a multi-process run take nothing: process 0 stands for the
        run. Where the file system has no flock (some network mounts) it warns and goes on.
        """
        self._acquired = True
        if jax.process_index() != 0:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._acquired = False
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.workdir} is in use by another run ({_describe_holder(holder)}; lock file "
                f"{self.path}): wait for it to end or give another workdir"
            ) from None
        except OSError as e:
            os.close(fd)
            logging.warning("Cannot lock %s (%s): a second run on it would not be stopped.",
                            self.path, e)  # fmt: skip
            return self
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode() + b"\n")
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file and lets it go (also done by the kernel if the process dies)."""
        self._acquired = False
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> WorkdirLock:
        return self if self._acquired else self.acquire()  # `with lock(workdir):` took it

    def __exit__(self, *exc) -> None:
        self.release()


def lock(workdir: str, kind: str = run_folder.RUN) -> WorkdirLock:
    """Claims and locks the folder for this run: `with workdir_lock.lock(workdir): ...`.

    Args:
      workdir: the run folder (created if missing).
      kind: `run_folder.RUN` (a training run) or `run_folder.CROSSVAL` (a cross-validation).

    Returns:
      The held `WorkdirLock`.

    Raises:
      WorkdirBusyError: another live process holds it (the message names its pid and host).
      FileExistsError, PermissionError: not a folder this run may write into (`claim`).
    """
    if jax.process_index() == 0:
        claim(workdir, kind)
    return WorkdirLock(workdir).acquire()


def claim(workdir: str, kind: str = run_folder.RUN) -> None:
    """Makes `workdir` a folder of `kind` (`run_folder.RUN` or `CROSSVAL`), or refuses it.

    A folder already marked as this kind (`run_folder.MARK_JSON`) is taken as it is; a new or
    empty one, or one of mnres 0.1 (a run: config.json, manifest.json and checkpoints/; a
    cross-validation: fold_0/), is marked. Nothing is written into any other folder: a user's
    files are never written over.

    Raises:
      FileExistsError: `workdir` is a file, holds files that are not of an mnres run, or is a
        folder of the other kind.
      PermissionError (an OSError): the folder cannot be created or written to.
    """
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise FileExistsError(f"{workdir} is a file, not a folder: give another --workdir")
    if os.path.isdir(workdir):
        # A lock file alone: a run that stopped before it marked the folder.
        names = set(_listdir(workdir)) - {run_folder.LOCK_FILE}
        if run_folder.MARK_JSON in names:
            found = _marked_kind(workdir)
            if found != kind:
                raise FileExistsError(
                    f"{workdir} is an mnres {found} folder, not a {kind} folder: give another "
                    "--workdir"
                )
            return
        if names and not _is_unmarked(names, workdir, kind):
            shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
            raise FileExistsError(
                f"{workdir} holds files that are not an mnres {kind} ({shown}) and is never "
                "written into: give another --workdir (a new or empty folder)"
            )
    try:
        os.makedirs(workdir, exist_ok=True)
        run_folder.write_json(os.path.join(workdir, run_folder.MARK_JSON), {"kind": kind})
    except OSError as e:
        raise PermissionError(
            f"cannot write into {workdir} ({e.strerror}): give a --workdir you can write to"
        ) from None


def _listdir(workdir: str) -> list[str]:
    try:
        return os.listdir(workdir)
    except OSError as e:
        raise PermissionError(
            f"cannot read {workdir} ({e.strerror}): give a --workdir you can write to"
        ) from None


def _marked_kind(workdir: str) -> str:
    try:
        return str(run_folder.read_json(os.path.join(workdir, run_folder.MARK_JSON))["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _is_unmarked(names: set[str], workdir: str, kind: str) -> bool:
    """A folder of `kind` written before folders were marked (mnres 0.1)."""
    if kind == run_folder.RUN:
        return {run_folder.CONFIG_JSON, run_folder.MANIFEST_JSON, run_folder.CHECKPOINTS_DIR} <= (
            names
        )
    return os.path.isdir(os.path.join(workdir, "fold_0"))


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"
