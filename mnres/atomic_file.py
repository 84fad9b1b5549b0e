"""The one way mnres writes a file: whole or not at all.

`writing(path)` writes to a temporary file in the same folder, flushes it to the disk (fsync)
and renames it over `path` (`os.replace`, atomic on POSIX). A full disk, a file size limit or a
kill mid-write leaves the previous file (or none), never a truncated one. The run folder's
files (`mnres.run_folder`) and the checkpoints' checksums (`mnres.training.checkpoint`) are
written through it; it is a module of its own because the checkpoints sit below the run folder.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def writing(path: str | os.PathLike, *, binary: bool = False) -> Iterator[IO]:
    """Opens a temporary file that replaces `path` once the `with` block ends without an error.

    Args:
      path: the file to write; its folder must exist.
      binary: a binary file ('wb') instead of a text file ('w', newlines as written).

    Raises:
      OSError: the write failed (`path` is as it was; the temporary file is removed).
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # 0o666 less the umask, as open() would create `path` (mkstemp's 0o600 would not).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb" if binary else "w", newline="" if not binary else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (`writing`)."""
    with writing(path) as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (`writing`): a link at `path` is replaced by the new
    file, never written through."""
    with writing(path, binary=True) as f:
        f.write(data)
