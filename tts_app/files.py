"""Replacing a file so that a reader sees the old content or the new, never half of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a fresh temp file in the same directory (so
    ``os.replace`` is a rename, and overlapping writers cannot clobber each other's temp),
    renamed over ``path``. Raises OSError; the temp file never outlives a failure.
    No fsync: what the app writes this way (cached audio) can be made again."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(name, 0o644)   # as open() would create it: mkstemp's is 0600
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            Path(name).unlink(missing_ok=True)
        raise
