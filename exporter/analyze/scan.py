"""Whole-chunk scanning for ``analyze``: compiled code, not a Python loop, walks the lines.

Why: a Python loop that looks at every line costs microseconds a line (22-28 s for 1 GB of
logs on two cores with every line through the parser, 9-12 s with one regex pass per format).
The compiled scanner (``_scan.c``) walks a 4 MB chunk in file order, about 3 ns a byte with
the report's bookkeeping, and hands Python one small summary per stretch of lines
("segment"): counts by level and status, durations as lists (so histograms fill in bulk, in
file order), length buckets, the time range and the few failed requests. Python adds each
segment to the :class:`Report`.

Exact by construction: the scanner takes only lines whose meaning under
:class:`RecordParser` their shape fixes, and converts only values whose conversion it can
vouch for (as ``orjson`` and :func:`convert_value` would make them). At any other line
("residue": a digit-led line that is no text record, broken JSON, keys in another order,
escapes in a value the report reads, aliased or repeated keys, quoted values the report
reads) it stops, and that line goes through the full parser here, in its place, before the
scanner resumes. Joins that need file order (a completion taking its start's text length)
go through the report's own pending map in that order. ``--no-fast`` reads every line with
the parser; tests/unit/test_analyze_scan.py compares the two on tricky lines, random
corruptions and randomly generated lines, with and without a window.

Times: stamps of one layout, minute and zone sort as text in time order, so for the time
range the scanner keeps the smallest and largest stamp of each such class and only those are
converted here. Where a line's own time matters (a ``--since``/``--until`` verdict, a
failure's first/last seen) the scanner adds the seconds to the minute's start as
:meth:`RecordParser.stamp` converts it, which is the parser's own arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.analyze.reader import ReadStats, first_stamp
from exporter.analyze.report import LENGTH_EDGES, PENDING_CAP, Report, length_bucket
from exporter.logs.parsers import MalformedLine, Record, RecordParser, normalise_level

try:
    from exporter.analyze._scan import Scanner as _NativeScanner
except ImportError:     # a source tree whose C part was never built: every line is parsed
    _NativeScanner = None  # type: ignore[assignment,misc]

NATIVE = _NativeScanner is not None
"""Whether the compiled scanner is built (``pip install`` builds it; see pyproject.toml)."""

START, COMPLETE, STAGE = "synthesis_start", "synthesis_complete", "stage_time"
# Fields the report reads, by canonical name
_READ_FIELDS = ("id", "status", "duration_ms", "error_code", "text_len", "model_stage", "stage")
# Keys of the JSON head the scanner requires; an alias that feeds a read field from one of
# them would change what the head means
_HEAD_KEYS = frozenset({"time", "level", "logger", "event"})
# Labels of the scanner's length buckets: one per edge, then the one past the last edge
_LENGTH_LABELS = (*map(length_bucket, LENGTH_EDGES), length_bucket(LENGTH_EDGES[-1] + 1))


@dataclass(frozen=True)
class Window:
    """``--since``/``--until``: records from ``since`` (inclusive) to ``until`` (exclusive)
    count in full; outside it only synthesis_start records count, for the text lengths of
    failures inside it."""

    since: float = -math.inf
    until: float = math.inf

    def keeps(self, when: float | None) -> bool:
        return when is not None and self.since <= when < self.until

    def verdict(self, record: Record) -> int:
        """1: add the record; -1: note only its start; 0: skip it."""
        if self.keeps(record.time):
            return 1
        return -1 if record.event == START else 0


def scanner_tables(parser: RecordParser) -> tuple[dict[bytes, str], dict[bytes, str]] | None:
    """Event and field names (with their aliases) for the compiled scanner, or None where
    the alias configuration is one it cannot mirror (a read field's own name aliasing
    another field, or an alias taken from the JSON head): then every line is parsed."""
    fields = {name.encode(): name for name in _READ_FIELDS}
    for name, canonical in parser.field_names.items():
        if name in _READ_FIELDS and canonical != name:
            return None
        if canonical in _READ_FIELDS:
            if name in _HEAD_KEYS:
                return None
            fields[name.encode()] = canonical
    names = set(parser.event_names) | {START, COMPLETE, STAGE}
    events = {name.encode(): parser.event_names.get(name, name) for name in names}
    return events, fields


@dataclass(slots=True)
class _Residue:
    """A line no fast shape fits, already through the full parser."""

    record: Record | None
    kind: str                  # "record", "continuation", "malformed" or "blank"


def _count(stats: ReadStats, kind: str) -> None:
    """Count one line the way :func:`~exporter.analyze.reader.file_records` does."""
    if kind != "blank":
        stats.lines += 1
        if kind == "record":
            stats.records += 1
        elif kind == "malformed":
            stats.malformed += 1
        else:
            stats.continuation += 1


class ChunkScanner:
    """Feeds line-aligned chunks into a :class:`Report` (see the module docstring)."""

    def __init__(self, parser: RecordParser, report: Report) -> None:
        self.parser = parser
        self.report = report
        tables = scanner_tables(parser)
        self._native = None if tables is None or _NativeScanner is None else \
            _NativeScanner(*tables, LENGTH_EDGES, PENDING_CAP, parser.stamp)
        self._levels: dict[bytes, str] = {}

    def scan(self, chunk: bytes, stats: ReadStats, window: Window | None = None) -> None:
        """Add one chunk (whole lines, each ending in ``\n``), only the records inside
        ``window`` where one is given (see :class:`Window`); its lines count either way."""
        if self._native is None:
            self.scan_slowly(chunk, stats, None if window is None else window.verdict)
            return
        bounds = None if window is None else (window.since, window.until)
        pos, end = 0, len(chunk)
        while pos < end:
            after, residue, segment = self._native.scan(chunk, pos, self.report.pending,
                                                        bounds)
            if after == pos and residue is None:
                raise RuntimeError(f"analyze scanner made no progress at byte {pos}")
            self._add_segment(segment, stats)
            if residue is not None:
                self._add_residue(residue, stats, window)
            pos = after

    def _add_segment(self, segment: dict[str, Any], stats: ReadStats) -> None:
        """One stretch of lines the scanner read (the keys are built in ``_scan.c``); its
        starts are already in ``report.pending``."""
        stats.lines += segment["lines"]
        stats.records += segment["records"]
        stats.continuation += segment["continuation"]
        report = self.report
        for level, n in segment["levels"].items():
            report.levels[self._level(level)] += n
        for text, low, high in segment["classes"]:
            for stamp in (low, high):
                when = self.parser.stamp(stamp.decode(), text)
                if when is not None:
                    report.note_time(when)
        report.completions(segment["statuses"], segment["durations"], segment["rids"])
        for (bucket, code), n in segment["lengths"].items():
            report.count_length(_LENGTH_LABELS[bucket], code, n)
        for rid, code in segment["orphans"]:
            report.orphan(rid, code)
        for code, model_stage, when, rid in segment["failed"]:
            report.failure(code, model_stage, when, rid)
        for stage, values in segment["stages"].items():
            report.stage_values(stage, values)

    def _add_residue(self, line: bytes, stats: ReadStats, window: Window | None) -> None:
        """A line the scanner left to the full parser."""
        item = self._read(line)
        _count(stats, item.kind)
        if item.record is not None:
            self._add_record(item.record, None if window is None else window.verdict)

    def _add_record(self, record: Record, keep: Callable[[Record], int] | None) -> None:
        verdict = 1 if keep is None else keep(record)
        if verdict > 0:
            self.report.add(record)
        elif verdict < 0 and record.event == START:
            self.report.note_start(record)

    def scan_slowly(self, chunk: bytes, stats: ReadStats,
                    keep: Callable[[Record], int] | None = None) -> None:
        """Every line through the full parser. ``keep(record)`` (time windows) returns 1 to
        add the record, 0 to skip it, -1 to note only a synthesis_start's length."""
        for line in chunk.split(b"\n")[:-1]:
            item = self._read(line)
            _count(stats, item.kind)
            if item.record is not None:
                self._add_record(item.record, keep)

    def bounds(self, chunk: bytes) -> tuple[float | None, float | None]:
        """Times of the chunk's first and last timestamped records (None where none is found
        within a few lines)."""
        head = chunk[:16384].split(b"\n")[:64]
        tail = chunk[-16384:].split(b"\n")[-65:]
        return first_stamp(head, self.parser), first_stamp(reversed(tail), self.parser)

    def _read(self, line: bytes) -> _Residue:
        try:
            record = self.parser.parse(line)
        except MalformedLine:
            return _Residue(None, "malformed")
        if record is None:
            return _Residue(None, "continuation" if line.strip() else "blank")
        return _Residue(record, "record")

    def _level(self, level: bytes) -> str:
        name = self._levels.get(level)
        if name is None:
            name = self._levels[level] = normalise_level(level.decode() or "INFO")
        return name
