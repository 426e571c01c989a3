"""Structured log lines exactly as the sidecar reads them (README: "The log contract").

JSON is the default; ``text`` writes the IndexTTS format
(``2024-06-12 14:22:38,415 - tts_app - INFO - synthesis_complete: request_id=…, status=…``).

Writing is split in two so that logging never decides a request's fate:
- :meth:`StructuredLog.event` (event loop) only formats the line and appends it to a bounded
  in-memory buffer; it never touches the disk and never raises for a disk problem.
- a writer thread takes the whole buffer at least every ``flush_interval_s`` (sooner once a
  batch is large, on :meth:`StructuredLog.flush` and on close) and hands it to
  :class:`LogFile`, which writes it with one ``os.write`` of whole records to an ``O_APPEND``
  descriptor (two when a size rotation falls inside the batch), so lines from several writers
  never interleave and logrotate's copytruncate keeps working.
A write that fails (disk full, file-size limit, I/O error) is counted per record in
:attr:`StructuredLog.write_errors` and :attr:`StructuredLog.failing` says it lasts; a buffer
that is full because the disk is far slower than the app counts the record as lost instead of
growing or stalling the event loop. The timestamp prefix is formatted once per
second: this sits on the cache-hit and rejection hot paths.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from tts_app.config import LogConfig

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_NEEDS_QUOTES = frozenset(' ,="\'\n\t')
# A batch this large is written without waiting for the flush interval: keeps each write
# (and the memory held between writes) small under heavy load.
_BATCH_BYTES = 256 << 10


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    text = value if isinstance(value, str) else str(value)
    if not text or any(c in _NEEDS_QUOTES for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _tell(message: str) -> None:
    """A line for the operator on stderr, which may sit on the same full disk."""
    with contextlib.suppress(OSError, ValueError):
        print(f"tts-app: {message}", file=sys.stderr, flush=True)


class LogFile:
    """The log file: appends whole batches, rotates by size, follows outside rotation.

    Rotation (``max_bytes`` > 0) renames ``tts-app.log`` to ``tts-app.log.1`` (``.1`` to
    ``.2`` … up to ``backups``; the oldest is replaced) before a batch would take the file past
    ``max_bytes``; a rename keeps the inode, so a tailer that follows device and inode finishes
    the old file. At most once per ``check_interval_s`` the path is compared with the open
    descriptor: after someone else renamed or deleted it, the path is reopened. Used by one
    thread at a time (the writer thread); never raises for a write problem.
    """

    def __init__(self, path: str | Path, max_bytes: int = 0, backups: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 check_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.errors = 0            # records in writes that failed, cumulative
        self.failing = False       # the last write failed
        self._clock = clock
        self._check_interval_s = check_interval_s
        self._next_check = clock() + check_interval_s
        self._torn = False         # a failed write may have left half a line
        self._fd = -1
        self._size = 0
        self._open()               # raises OSError at start-up: an unusable path is fatal then

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _check_path(self) -> None:
        """Reopen after an outside rename/delete; refresh the size after an outside truncate."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            same = False
        try:
            if same:
                self._size = os.fstat(self._fd).st_size
            else:
                self._open()
        except OSError:
            pass            # keep writing to the old descriptor rather than lose lines

    def _rotate(self) -> bool:
        try:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._open()
        except OSError:
            self._check_path()  # a half-done rotation: write wherever the path now leads
            return False
        return True

    def write(self, records: list[bytes]) -> None:
        """Append whole records: one write per file they go to (a rotation splits a batch,
        so no file grows past ``max_bytes`` unless one record alone is larger)."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_interval_s
            self._check_path()
        start, rotating = 0, bool(self.max_bytes)
        while start < len(records):
            if rotating and self._size and self._size + len(records[start]) > self.max_bytes:
                rotating = self._rotate()   # failed: this batch goes to the current file
            room = self.max_bytes - self._size if rotating else None
            end, size = start + 1, len(records[start])     # a record larger than room alone
            while end < len(records) and (room is None or size + len(records[end]) <= room):
                size += len(records[end])
                end += 1
            self._append(b"".join(records[start:end]), end - start)
            start = end

    def _append(self, data: bytes, records: int) -> None:
        """One write of ``data``; a failure is counted, never raised."""
        if self._torn:
            data = b"\n" + data     # end the torn line so the next record parses on its own
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError as exc:
            self.errors += records
            self._torn = len(view) < len(data)
            if not self.failing:
                self.failing = True
                _tell(f"cannot write the log {self.path} ({exc}); records are counted as "
                      f"lost until a write succeeds")
            return
        self._torn = False
        if self.failing:
            self.failing = False
            _tell(f"the log {self.path} is writable again ({self.errors} records lost so far)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StructuredLog:
    """Writes contract events; ``event(...)`` is the only call the app makes per record."""

    def __init__(self, path: str | Path, fmt: str = "json", logger: str = "tts_app",
                 level: str = "INFO", clock: Callable[[], float] = time.time,
                 max_bytes: int = 0, backups: int = 1, flush_interval_s: float = 0.1,
                 buffer_max_bytes: int = 16 << 20) -> None:
        self.file = LogFile(path, max_bytes, backups)
        self._json = fmt == "json"
        self.logger = logger
        self._min_level = LEVELS[level]
        self._clock = clock
        self._second = -1
        self._iso_prefix = ""
        self._iso_offset = ""
        self._text_prefix = ""
        self._flush_interval_s = flush_interval_s
        self._buffer_max_bytes = buffer_max_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._appended = 0          # records accepted into the buffer, cumulative
        self._done = 0              # records the writer has written or counted as lost
        self._dropped = 0           # records refused by a full buffer
        self._urgent = False        # flush() or a large batch: write without waiting
        self._closed = False
        self._cond = threading.Condition()
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()
        # An exit that skips close() (a start-up error, an uncaught exception) still writes
        # what was logged; a daemon writer alone would be killed with it unwritten.
        atexit.register(self.close)

    @classmethod
    def from_config(cls, config: LogConfig) -> StructuredLog:
        return cls(config.path, config.format, config.logger, config.level,
                   max_bytes=config.max_bytes, backups=config.backups,
                   flush_interval_s=config.flush_interval_s,
                   buffer_max_bytes=config.buffer_max_bytes)

    @property
    def write_errors(self) -> int:
        """Records that never reached the file (failed writes and a full buffer)."""
        return self.file.errors + self._dropped

    @property
    def failing(self) -> bool:
        """True while the log cannot be written (the last write failed)."""
        return self.file.failing

    def _stamp(self, now: float) -> tuple[str, str, int]:
        second = int(now)
        if second != self._second:
            moment = datetime.fromtimestamp(second).astimezone()
            self._iso_prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
            offset = moment.strftime("%z")
            self._iso_offset = f"{offset[:3]}:{offset[3:]}"
            self._text_prefix = moment.strftime("%Y-%m-%d %H:%M:%S")
            self._second = second
        return self._iso_prefix, self._text_prefix, int((now - second) * 1000)

    def event(self, event: str, request_id: str | None = None, level: str = "INFO",
              logger: str | None = None, traceback: str | None = None, **fields: Any) -> None:
        """Queue one record; ``traceback`` becomes a field (JSON) or continuation lines (text)."""
        if LEVELS[level] < self._min_level:
            return
        iso, text_time, ms = self._stamp(self._clock())
        name = logger or self.logger
        if self._json:
            record: dict[str, Any] = {
                "time": f"{iso}.{ms:03d}{self._iso_offset}", "level": level, "logger": name,
                "event": event, "request_id": request_id}
            record.update(fields)
            if traceback:
                record["traceback"] = traceback
            line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        else:
            parts = [] if request_id is None else [f"request_id={_text_value(request_id)}"]
            parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
            line = f"{text_time},{ms:03d} - {name} - {level} - {event}: {', '.join(parts)}\n"
            if traceback:
                line += traceback.rstrip("\n") + "\n"
        self._append(line.encode("utf-8", "replace"))

    def _append(self, data: bytes) -> None:
        cond = self._cond
        with cond:
            if self._closed or self._pending_bytes + len(data) > self._buffer_max_bytes:
                # The disk is far slower than the app (or hung): waiting here would stall the
                # event loop, growing would exhaust memory; the record is counted as lost.
                self._dropped += 1
                return
            wake = not self._pending
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._appended += 1
            if self._pending_bytes >= _BATCH_BYTES and not self._urgent:
                self._urgent = wake = True
            if wake:
                cond.notify()

    def _run(self) -> None:
        """The writer thread: one write per batch until closed and drained."""
        cond = self._cond
        while True:
            with cond:
                cond.wait_for(lambda: self._pending or self._closed)
                cond.wait_for(lambda: self._urgent or self._closed,
                              timeout=self._flush_interval_s)
                batch, records = self._pending, len(self._pending)
                self._pending, self._pending_bytes, self._urgent = [], 0, False
                closed = self._closed
            if batch:
                self.file.write(batch)
                with cond:
                    self._done += records
                    cond.notify_all()       # flush() waiters
            if closed and not batch:
                return

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Write everything queued so far; True when it was written (or counted as lost)."""
        with self._cond:
            target = self._appended
            self._urgent = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout_s)

    def close(self) -> None:
        """Write what is queued, stop the writer, close the file; later records are counted
        as lost."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        atexit.unregister(self.close)
        self._writer.join()
        self.file.close()
