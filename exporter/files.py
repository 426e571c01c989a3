"""Replacing a file so that a reader sees the old content or the new, never half of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, durable: bool = False,
                     temp: Path | None = None) -> None:
    """Replace ``path`` with ``data``: write a temp file in the same directory (so
    ``os.replace`` is a rename), readable by other users (the app reads the gate file), then
    rename it over ``path``. Raises OSError; the temp file never outlives a failure.

    ``temp``: a fixed temp name, for a single writer whose temp must be known beforehand
    (the log tailer skips the checkpoint's); by default a fresh name per write, so
    overlapping writers cannot clobber each other's temp.
    ``durable``: fsync the file and then its directory, so the new content survives a power
    loss, not only a crash of this process.
    """
    if temp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        temp = Path(name)
    else:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            temp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
