"""Structured log lines exactly as the sidecar reads them (README: "The log contract").

One line per record, written with a single ``os.write`` to an ``O_APPEND`` descriptor so lines
from several writers never interleave and logrotate's copytruncate keeps working. JSON is the
default; ``text`` writes the IndexTTS format
(``2024-06-12 14:22:38,415 - tts_app - INFO - synthesis_complete: request_id=…, status=…``).
The timestamp prefix is formatted once per second: this sits on the cache-hit hot path.
Once per second the path is also checked: after a rename rotation (or deletion) the file is
reopened, so the sidecar sees the new file without the app needing a signal.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_NEEDS_QUOTES = frozenset(' ,="\'\n\t')


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    text = value if isinstance(value, str) else str(value)
    if not text or any(c in _NEEDS_QUOTES for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class StructuredLog:
    """Writes contract events; ``event(...)`` is the only call the app makes."""

    def __init__(self, path: str | Path, fmt: str = "json", logger: str = "tts_app",
                 level: str = "INFO", clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._fd = -1
        self._open()
        self._json = fmt == "json"
        self.logger = logger
        self._min_level = LEVELS[level]
        self._clock = clock
        self._second = -1
        self._iso_prefix = ""
        self._iso_offset = ""
        self._text_prefix = ""

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd

    def _reopen_if_rotated(self) -> None:
        try:
            rotated = os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except OSError:
            rotated = True
        if rotated:
            # on failure keep writing to the old descriptor rather than lose lines
            with contextlib.suppress(OSError):
                self._open()

    def _stamp(self, now: float) -> tuple[str, str, int]:
        second = int(now)
        if second != self._second:
            self._reopen_if_rotated()
            moment = datetime.fromtimestamp(second).astimezone()
            self._iso_prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
            offset = moment.strftime("%z")
            self._iso_offset = f"{offset[:3]}:{offset[3:]}"
            self._text_prefix = moment.strftime("%Y-%m-%d %H:%M:%S")
            self._second = second
        return self._iso_prefix, self._text_prefix, int((now - second) * 1000)

    def event(self, event: str, request_id: str | None = None, level: str = "INFO",
              logger: str | None = None, traceback: str | None = None, **fields: Any) -> None:
        """Write one record; ``traceback`` becomes a field (JSON) or continuation lines (text)."""
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
        os.write(self._fd, line.encode("utf-8", "replace"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
