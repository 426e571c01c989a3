"""Whole-chunk scanning for ``analyze``: compiled code, not a Python loop, walks the lines.

Why: a Python loop that looks at every line costs microseconds a line, many times the time
it takes to read the files (docs/benchmarks.md, "Forensics").
The compiled scanner (``_scan.c``) walks a 4 MB chunk in file order, with the report's
bookkeeping, and hands Python one small summary per stretch of lines
("segment"): counts by level and status, durations as lists (so histograms fill in bulk, in
file order), length buckets, the time range and the few failed requests. Python adds each
segment to the :class:`Report`.

Exact by construction: the scanner takes only lines whose meaning under :class:`RecordParser`
their shape fixes, and converts only values whose conversion it can vouch for (as ``orjson``
and :func:`convert_value` would make them). At any other line ("residue": a digit-led line that
is no text record, broken JSON, keys in another order, escapes in a value the report reads, a
field given twice (repeated, or under two of its aliases), quoted values the report reads, a
``text`` without ``text_len``, a rejection or gateway line, a warning or error whose code or
id is not a plain string) it stops, and that line goes through the full parser here, in its
place, before the scanner resumes. Joins that need file order (a completion taking its
start's text length) go through the report's own pending map in that order. Warnings and
errors come back as (level, code, time, id) for the report's counts by code. ``--no-fast``
reads every line with the parser; tests/unit/test_analyze_scan.py compares the two on tricky
lines, random corruptions and randomly generated lines, with and without a window.

Times: stamps of one layout, minute and zone sort as text in time order, so for the time
range the scanner keeps the smallest and largest stamp of each such class and only those are
converted here. Where a line's own time matters (a ``--since``/``--until`` verdict, a
failure's first/last seen) the scanner adds the seconds to the minute's start as
:meth:`RecordParser.stamp` converts it, which is the parser's own arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.analyze.reader import ReadStats, first_stamp
from exporter.analyze.report import LENGTH_EDGES, PENDING_CAP, Report, length_bucket
from exporter.logs.parsers import (
    MalformedLine,
    NameTables,
    Record,
    RecordParser,
    normalise_level,
)

if TYPE_CHECKING:
    from exporter.analyze._scan import Segment

try:
    from exporter.analyze._scan import Scanner as _NativeScanner
except ImportError:     # a source tree whose C part was never built: every line is parsed
    _NativeScanner = None  # type: ignore[assignment,misc]

NATIVE = _NativeScanner is not None
"""Whether the compiled scanner is built (``pip install`` builds it; see pyproject.toml)."""

START, COMPLETE, STAGE = "synthesis_start", "synthesis_complete", "stage_time"
# Events the scanner leaves to the parser whatever their shape (see _scan.c apply_record)
GATEWAY, REJECTED = "gateway_request", "request_rejected"
# Fields the report reads, by canonical name
_READ_FIELDS = ("id", "status", "duration_ms", "error_code", "text_len", "model_stage", "stage",
                "text", "warning_code")
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

    def add(self, report: Report, record: Record) -> None:
        """Add the record if it is inside; outside, note only a start's text length."""
        if self.keeps(record.time):
            report.add(record)
        elif record.event == START:
            report.note_start(record)


def scanner_tables(parser: RecordParser) -> NameTables | None:
    """Event and field names (with their aliases) for the compiled scanner, or None where
    the alias configuration is one it cannot mirror (a read field's own name aliasing
    another field, or an alias taken from the JSON head): then every line is parsed. (The
    CLI's parser has the default aliases, which it mirrors; other configurations come from
    library callers.)"""
    return parser.name_tables(_READ_FIELDS, (START, COMPLETE, STAGE, GATEWAY, REJECTED),
                              _HEAD_KEYS)


@dataclass(slots=True)
class _ParsedLine:
    """A line through the full parser: its record (if it starts one) and its kind."""

    record: Record | None
    kind: str                  # "record", "continuation", "malformed" or "blank"


class ChunkScanner:
    """Feeds line-aligned chunks into a :class:`Report` (see the module docstring)."""

    def __init__(self, parser: RecordParser, report: Report) -> None:
        self.parser = parser
        self.report = report
        tables = scanner_tables(parser)
        self._native = (None if tables is None or _NativeScanner is None
                        else _NativeScanner(*tables, LENGTH_EDGES, PENDING_CAP, parser.stamp))
        self._levels: dict[bytes, str] = {}

    def scan(self, chunk: bytes, stats: ReadStats, window: Window | None = None) -> None:
        """Add one chunk (whole lines, each ending in ``\n``), only the records inside
        ``window`` where one is given (see :class:`Window`); its lines count either way."""
        if self._native is None:
            self.scan_slowly(chunk, stats, window)
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

    def _add_segment(self, segment: Segment, stats: ReadStats) -> None:
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
        for level, counted_code, when, counted_rid in segment["counted"]:
            report.record_code(self._level(level), counted_code, when, counted_rid)
        for stage, values in segment["stages"].items():
            report.stage_values(stage, values)

    def _add_residue(self, line: bytes, stats: ReadStats, window: Window | None) -> None:
        """A line the scanner left to the full parser."""
        item = self._read(line)
        stats.count(item.kind)
        if item.record is not None:
            self._add_record(item.record, window)

    def _add_record(self, record: Record, window: Window | None) -> None:
        if window is None:
            self.report.add(record)
        else:
            window.add(self.report, record)

    def scan_slowly(self, chunk: bytes, stats: ReadStats, window: Window | None = None) -> None:
        """Every line through the full parser (what :meth:`scan` does where the compiled
        scanner is missing or cannot mirror the aliases)."""
        lines = chunk.split(b"\n")
        if not lines[-1]:
            lines.pop()                 # the chunk's final newline ends the last line
        for line in lines:
            item = self._read(line)
            stats.count(item.kind)
            if item.record is not None:
                self._add_record(item.record, window)

    def bounds(self, chunk: bytes) -> tuple[float | None, float | None]:
        """Times of the chunk's first and last timestamped records (None where none is found
        within a few lines)."""
        head = chunk[:16384].split(b"\n")[:64]
        tail = chunk[-16384:].split(b"\n")[-65:]
        return first_stamp(head, self.parser), first_stamp(reversed(tail), self.parser)

    def _read(self, line: bytes) -> _ParsedLine:
        try:
            record = self.parser.parse(line)
        except MalformedLine:
            return _ParsedLine(None, "malformed")
        if record is None:
            return _ParsedLine(None, "continuation" if line.strip() else "blank")
        return _ParsedLine(record, "record")

    def _level(self, level: bytes) -> str:
        name = self._levels.get(level)
        if name is None:
            name = self._levels[level] = normalise_level(level.decode())
        return name
