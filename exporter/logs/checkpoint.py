"""The tailer's checkpoint: file offsets and the log-derived counters, in one atomic file.

Offsets alone would not make totals exact: after a ``kill -9`` the counters restart from 0
while the offsets skip the lines already read, so everything before the checkpoint would be
lost from the totals. Storing the counters *taken at the same instant as the offsets* (both
under the metrics lock) fixes that: on restart the counters come back to exactly what the
offsets cover, and every line after the offsets is read (and counted) again. Nothing is lost
and nothing is counted twice, whatever moment the process died at.

The file is JSON::

    {"version": 4,
     "files": [{"path": "logs/tts-app.log", "dev": 2049, "ino": 131, "fingerprint": "9c1f…",
                "fingerprint_len": 256, "offset": 52311}],
     "metrics": {"tts_exporter_log_lines": [[["parsed"], 812.0]], …}}

Loading validates it completely: the offsets here, the metric samples against the families they
restore (``check``, normally :meth:`MetricSet.check_state`: shapes, label counts, bucket counts,
finite non-negative values). Older formats are migrated (:data:`MIGRATIONS`) first.

It is written with the classic write-temp, fsync, rename, fsync-directory sequence, so a crash
leaves either the old or the new checkpoint, never a torn one. A file that cannot be read or
parsed anyway (disk trouble, hand edits) is moved aside and reported, never fatal: the tailer
then starts as on first run and reads the files from the start.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from msgspec import Meta, structs

from exporter.files import write_atomically
from exporter.logs.pipeline import error_label
from exporter.schema import ForeignSchema, InvalidInput, validate

log = logging.getLogger("exporter.logs.checkpoint")

FORMAT_VERSION = 4

StateCheck = Callable[[object], None]
"""Raises ValueError, saying where, unless a checkpoint's ``metrics`` restore completely."""


def _label_added(family: str, value: str, first: bool) -> Callable[[dict[str, Any]], None]:
    """A migration giving every sample of a counter ``family`` one more label (first or
    last), set to ``value``: what the new label would have said is not known."""
    def migrate(metrics: dict[str, Any]) -> None:
        samples = metrics.get(family)
        for sample in samples if isinstance(samples, list) else ():
            if isinstance(sample, list) and sample and isinstance(sample[0], list):
                sample[0] = [value, *sample[0]] if first else [*sample[0], value]
    return migrate


def _error_and_length_class(metrics: dict[str, Any]) -> None:
    """Version 3 added the ``error`` label to tts_http_requests (an old series gets what a line
    without error_code gets: none, or other for a 4xx/5xx) and ``length_class`` to
    tts_synthesis_duration_seconds (old series: unknown)."""
    requests = metrics.get("tts_http_requests")
    for sample in requests if isinstance(requests, list) else ():
        if isinstance(sample, list) and sample and isinstance(sample[0], list) \
                and len(sample[0]) == 3:
            sample[0].append(error_label(None, sample[0][2]))
    duration = metrics.get("tts_synthesis_duration_seconds")
    series = duration.get("series") if isinstance(duration, dict) else None
    for sample in series if isinstance(series, list) else ():
        if isinstance(sample, list) and sample and sample[0] == []:
            sample[0].append("unknown")


MIGRATIONS: dict[int, Callable[[dict[str, Any]], None]] = {
    # Version 1 counted label overflows by label only, version 2 by family and label.
    1: _label_added("tts_exporter_label_overflow", "unknown", first=True),
    # Version 3 counts syntheses by the model version that ran them.
    2: _label_added("tts_syntheses", "unknown", first=False),
    # Version 4 splits requests by the app's error code and latency by text length.
    3: _error_and_length_class,
}
"""``version: migrate(metrics)``, which turns that version's metrics into the next one's."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a checkpoint holds")


class FileOffset(ForeignSchema, frozen=True):
    """Where reading stopped in one file, and what identifies that file.

    ``(dev, ino)`` alone is not enough: after a delete the inode number may be handed to a new
    file. ``fingerprint`` is a hash of the file's first ``fingerprint_len`` bytes, which a
    recycled inode will not share.
    """

    path: Annotated[str, Meta(max_length=4096)]
    dev: Annotated[int, Meta(ge=0)]  # msgspec bounds every int to 64 bits
    ino: Annotated[int, Meta(ge=0)]
    fingerprint: Annotated[str, Meta(max_length=256)]
    fingerprint_len: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    offset: Annotated[int, Meta(ge=0, le=2**63 - 1)]

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.ino


@dataclass
class Checkpoint:
    """Everything persisted: the offsets and the ``dump_state`` of the log-derived metrics."""

    files: list[FileOffset] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": FORMAT_VERSION, "written_at": time.time(),
                           "files": [structs.asdict(f) for f in self.files],
                           "metrics": self.metrics},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, check: StateCheck | None = None) -> Checkpoint:
        """Parse a checkpoint; raises ValueError (with what was wrong) on anything unexpected."""
        try:
            document = validate(_Document, json.loads(text, parse_constant=_no_constant))
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        for old in range(document.version, FORMAT_VERSION):
            MIGRATIONS[old](document.metrics)
        if check is not None:
            check(document.metrics)
        return cls(document.files, document.metrics)


class _Document(ForeignSchema, frozen=True):
    version: Annotated[int, Meta(ge=1, le=FORMAT_VERSION)]
    files: list[FileOffset]
    metrics: dict[str, Any]


class CheckpointStore:
    """Reads and atomically writes the checkpoint file at ``path``."""

    def __init__(self, path: str | os.PathLike[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock

    @property
    def temp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def load(self, check: StateCheck | None = None) -> Checkpoint | None:
        """The stored checkpoint; None when there is none *or* it was unusable (including
        metrics that ``check`` rejects).

        An unusable file is renamed to ``<path>.corrupt-<unix time>`` (kept for a post-mortem,
        and out of the way so the next checkpoint can be written) and logged as an error.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self._move_aside(f"cannot be read ({exc})")
            return None
        try:
            return Checkpoint.from_json(text, check)
        except (ValueError, RecursionError) as exc:
            self._move_aside(f"is not a valid checkpoint ({exc})")
            return None

    def _move_aside(self, problem: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self.clock())}")
        try:
            os.replace(self.path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"could not be moved aside ({exc})"
        log.error("log checkpoint %s %s; %s; reading every log file from the start",
                  self.path, problem, where)

    def save(self, checkpoint: Checkpoint) -> None:
        """Write atomically: temp file, fsync, rename over, fsync the directory.

        Raises OSError (disk full, permissions); the caller counts it and tries again later.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, checkpoint.to_json().encode("utf-8"), durable=True,
                         temp=self.temp_path)
