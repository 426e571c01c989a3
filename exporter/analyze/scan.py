"""Whole-chunk scanning for ``analyze``: the regex engine, not a Python loop, walks the lines.

Why: a Python loop that looks at every line costs microseconds a line (17 s for 1 GB of logs
on two cores). Here one ``findall`` per format walks a 4 MB chunk in C and hands Python one
small tuple per line: levels are counted with ``Counter`` over the tuples, stage_time
durations go to the histograms in bulk, and only synthesis_start/synthesis_complete lines
(and the rare lines no fast shape fits) are handled one by one.

Exact by construction: a line takes a fast shape only when that shape fixes what
:class:`RecordParser` would make of it, and captured values go through the parser's own
conversions (``orjson`` for JSON values, :func:`convert_value` for text), so the report is the
one ``--no-fast`` computes (tests/unit/test_analyze_scan.py compares them on tricky and
randomly corrupted logs). Every other line ("residue": tracebacks, free-form messages, broken
JSON, other key orders, escapes, aliased or repeated keys) is parsed in full. The shapes:

* JSON in the contract's head order (``{"time": "…", "level": "…", "logger": "…", "event":
  "…"``) with ``json.dumps``' separators, flat values and no escapes, checked to the closing
  brace (so a cut-short or corrupted line is still reported malformed).
* The IndexTTS text head (``2024-06-12 14:22:38,415 - logger - LEVEL - event: k=v, …``) with
  quote-free values.
* stage_time as the contract writes it (id, stage, duration_ms, nothing else), and
  synthesis_start/synthesis_complete with the id right after the event and the other keys in
  any order; keys that alias a field the report reads send the line to the full parse.

Two things are per chunk rather than per line: the time range comes from each chunk's first
and last lines (rotated logs are written in time order; ``--no-fast`` reads every stamp), and a
chunk that mixes both formats while a completion needs its start's text length is parsed line
by line, since the two per-format passes do not keep the lines' relative order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter

from orjson import loads as json_loads

from exporter.analyze.reader import ReadStats, first_stamp
from exporter.analyze.report import Report
from exporter.logs.parsers import (
    MalformedLine,
    Record,
    RecordParser,
    convert_value,
    normalise_level,
)

START, COMPLETE, STAGE = "synthesis_start", "synthesis_complete", "stage_time"
# Fields the report reads, by canonical name: their aliases must not hide in "other" keys.
_READ_FIELDS = ("id", "status", "duration_ms", "error_code", "text_len", "model_stage", "stage")
_CACHE_CAP = 4096

# JSON pieces: strings without escapes or control characters (orjson rejects the latter), and
# numbers that orjson reads as finite (an overflowing exponent is a parse error there).
_JCHARS = rb'[^"\\\x00-\x1f]*'
_JNUM = rb"-?(?:0|[1-9]\d{0,17})(?:\.\d+)?(?:[eE][+-]?\d{1,2})?"
_JVAL = rb'(?:"' + _JCHARS + rb'"|' + _JNUM + rb"|true|false|null)"
# Text pieces: values without quotes, whitespace or commas (so the parser's quote-free pair
# split applies and nothing is stripped), keys as the parser's pair regex reads them.
_TVAL = rb"[^,\s\"'=]"
_TKEY = rb"[A-Za-z_][\w.]*"
_TEXT_STAMP = rb"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?)"
# Tuple layout shared by both formats' main pattern (groups in the order they open). A
# duration is captured in its numeric group when it is a plain number (float() reads it as the
# parser would), else in its "other" group, which goes through the parser's conversion.
(_STAMP, _LEVEL, _STAGE, _STAGE_NUM, _STAGE_OTHER, _EVENT, _RID, _TEXT_LEN, _STATUS,
 _DURATION_NUM, _DURATION_OTHER, _CODE, _MODEL_STAGE, _RAW) = range(14)
_GROUPS = 14
_COMPLETE_FIELDS = (("status", _STATUS), ("duration_ms", _DURATION_OTHER), ("text_len", _TEXT_LEN),
                    ("error_code", _CODE), ("model_stage", _MODEL_STAGE))


def _alt(names: Iterable[str]) -> bytes:
    return b"|".join(re.escape(name.encode()) for name in sorted(set(names), key=len,
                                                                  reverse=True))


@dataclass(frozen=True)
class _Patterns:
    """The compiled shapes for one alias configuration."""

    json: re.Pattern[bytes]
    text: re.Pattern[bytes]
    events: dict[bytes, str]          # start/complete event name as written -> canonical


def _names(parser: RecordParser, canonical: str) -> list[str]:
    """Event names the parser maps to ``canonical`` (the name itself unless re-aliased)."""
    names = [name for name, target in parser.event_names.items() if target == canonical]
    if parser.event_names.get(canonical, canonical) == canonical:
        names.append(canonical)
    return names


def build_patterns(parser: RecordParser) -> _Patterns:
    """Compile the fast shapes for the parser's aliases (see the module docstring)."""
    starts, completes, stages = (_names(parser, e) for e in (START, COMPLETE, STAGE))
    read = [name for name, canonical in parser.field_names.items()
            if canonical in _READ_FIELDS] + list(_READ_FIELDS)
    ids = _alt(name for name, canonical in parser.field_names.items() if canonical == "id")
    interesting = _alt(starts + completes + stages)
    x_names = _alt(starts + completes)
    stage_names = _alt(stages)
    pairs = (b"text_len", b"status", b"duration_ms", b"error_code", b"model_stage")

    # JSON: a key neither read by the report nor a second copy of a head key
    json_other = (rb'"(?!(?:' + _alt([*read, "time", "level", "event"]) + rb')")' + _JCHARS
                  + rb'": ' + _JVAL)
    # the same for a line whose event the report does not read: only the head keys matter
    json_plain = rb'"(?!(?:time|level|event)")' + _JCHARS + rb'": ' + _JVAL
    json_number = rb"(" + _JNUM + rb")(?=[,}])|(" + _JVAL + rb")"
    json_x_pairs = b"|".join(
        rb'"' + key + rb'": ' + (rb"(?:" + json_number + rb")" if key == b"duration_ms"
                                 else rb"(" + _JVAL + rb")") for key in pairs)
    json = (
        rb'\n(?:\{"time": "(' + _JCHARS + rb')", "level": "(?:INFO|([A-Z]+))", "logger": "'
        + _JCHARS + rb'", "event": "(?:'
        + rb"(?!(?:" + interesting + rb')")' + _JCHARS + rb'"(?:, ' + json_plain + rb")*\}"
        + rb"|(?:" + stage_names + rb')", "(?:' + ids + rb')": "' + _JCHARS + rb'", "stage": ('
        + _JVAL + rb'), "duration_ms": (?:' + json_number + rb")\}"
        + rb"|(" + x_names + rb')", "(?:' + ids + rb')": "(' + _JCHARS + rb')"(?:, (?:'
        + json_x_pairs + b"|" + json_other + rb"))*\}"
        + rb")\r?(?=\n)|(\{.*))")
    # text: quote-free values, so the parser's quote-free pair split applies unchanged
    text_other = rb"(?!(?:" + _alt(read) + rb")=)" + _TKEY + rb"=" + _TVAL + rb"*"
    text_number = rb"(-?\d+(?:\.\d+)?)(?=,|\r?\n)|(" + _TVAL + rb"+)"
    text_x_pairs = b"|".join(
        key + b"=" + (rb"(?:" + text_number + rb")" if key == b"duration_ms"
                      else rb"(" + _TVAL + rb"+)") for key in pairs)
    text = (
        rb"\n(?:" + _TEXT_STAMP + rb" - [!-~]+ - (?:INFO|([A-Z]+)) - (?:"
        + rb"(?!(?:" + interesting + rb"):)"
        + rb"|(?:" + stage_names + rb"): (?:" + ids + rb")=" + _TVAL + rb"+, stage=(" + _TVAL
        + rb"+), duration_ms=(?:" + text_number + rb")\r?(?=\n)"
        + rb"|(" + x_names + rb"): (?:" + ids + rb")=(" + _TVAL + rb"+)(?:, (?:"
        + text_x_pairs + b"|" + text_other + rb"))*\r?(?=\n)"
        + rb")|(?!\{)(.+))")
    patterns = _Patterns(
        json=re.compile(json), text=re.compile(text),
        events={name.encode(): START for name in starts}
        | {name.encode(): COMPLETE for name in completes})
    assert patterns.json.groups == patterns.text.groups == _GROUPS
    return patterns


class _ValueCache:
    """Raw value bytes -> the value the parser would produce, remembered for repeats
    (status, error codes, stages and many durations recur); bounded."""

    def __init__(self, convert: Callable[[bytes], object]) -> None:
        self.convert = convert
        self.cache: dict[bytes, object] = {}

    def __call__(self, raw: bytes) -> object:
        try:
            return self.cache[raw]
        except KeyError:
            value = self.convert(raw)
            if len(self.cache) >= _CACHE_CAP:
                self.cache.clear()
            self.cache[raw] = value
            return value


def _text_value(raw: bytes) -> object:
    return convert_value(raw.decode("utf-8", "replace"))


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


_Item = tuple[bytes, ...] | _Residue      # a fast start/complete row, or a parsed residue line


class ChunkScanner:
    """Feeds line-aligned chunks into a :class:`Report` (see the module docstring)."""

    def __init__(self, parser: RecordParser, report: Report) -> None:
        self.parser = parser
        self.report = report
        self.patterns = build_patterns(parser)
        self._json = _ValueCache(json_loads)
        self._text = _ValueCache(_text_value)
        self._levels: dict[bytes, str] = {}

    def scan(self, chunk: bytes, stats: ReadStats, starts_only: bool = False) -> None:
        """Add one chunk (whole lines, each ending in ``\n``). With ``starts_only`` only
        synthesis_start records count (a chunk before ``--since``: their text lengths serve
        failures inside the window); its lines are counted either way."""
        body = b"\n" + chunk
        parts = []
        for pattern, text in ((self.patterns.json, False), (self.patterns.text, True)):
            rows = pattern.findall(body)
            ordered: list[_Item] = [row if row[_EVENT] else self._read(row[_RAW])
                                    for row in rows if row[_EVENT] or row[_RAW]]
            parts.append((rows, ordered, text))
        if not starts_only and all(ordered for _, ordered, _ in parts) \
                and any(map(self._needs_start, (i for _, o, _ in parts for i in o))):
            # a completion that needs its start's text length, with lines of both formats:
            # the two passes lose their relative order, so keep the exact order instead
            self.scan_slowly(chunk, stats)
            return
        for rows, ordered, text in parts:
            self._add_rows(rows, ordered, text, stats, starts_only)

    def _needs_start(self, item: _Item) -> bool:
        """A completion without its own integer text_len (it takes its start's)."""
        if isinstance(item, _Residue):
            if item.record is None or item.record.event != COMPLETE:
                return False
            text_len = item.record.fields.get("text_len")
            return not isinstance(text_len, int) or isinstance(text_len, bool)
        return self.patterns.events[item[_EVENT]] == COMPLETE and not item[_TEXT_LEN]

    def _add_rows(self, rows: list[tuple[bytes, ...]], ordered: list[_Item], text: bool,
                  stats: ReadStats, starts_only: bool) -> None:
        """One format's rows: levels and stage times in bulk, the rest in file order."""
        residue = 0
        for item in ordered:
            if isinstance(item, _Residue):
                residue += 1
                _count(stats, item.kind)
                record = item.record
                if record is None:
                    continue
                if not starts_only:
                    self.report.add(record)
                elif record.event == START:
                    self.report.note_start(record)
            elif self.patterns.events[item[_EVENT]] == START:
                self._start(item, text)
            elif not starts_only:
                self._complete(item, text)
        stats.lines += len(rows) - residue
        stats.records += len(rows) - residue
        if starts_only:
            return
        levels = Counter(map(itemgetter(_LEVEL), rows))
        levels[b""] -= residue                       # residue records were added above
        for level, n in levels.items():
            if n:
                self.report.levels[self._level(level)] += n
        self._add_stages(rows, text)
        self._note_times(rows, text)

    def _add_stages(self, rows: list[tuple[bytes, ...]], text: bool) -> None:
        numbers: dict[bytes, list[bytes]] = {}
        others: list[tuple[bytes, bytes]] = []
        for row in rows:
            stage = row[_STAGE]
            if stage:
                if row[_STAGE_NUM]:
                    numbers.setdefault(stage, []).append(row[_STAGE_NUM])
                else:
                    others.append((stage, row[_STAGE_OTHER]))
        convert = self._text if text else self._json
        for stage, values in numbers.items():
            self.report.stage_values(convert(stage), list(map(float, values)))
        for (stage, other), n in Counter(others).items():
            self.report.stage(convert(stage), convert(other), n)

    def scan_slowly(self, chunk: bytes, stats: ReadStats,
                    keep: Callable[[Record], int] | None = None) -> None:
        """Every line through the full parser. ``keep(record)`` (time windows) returns 1 to
        add the record, 0 to skip it, -1 to note only a synthesis_start's length."""
        for line in chunk.split(b"\n")[:-1]:
            item = self._read(line)
            _count(stats, item.kind)
            record = item.record
            if record is None:
                continue
            verdict = 1 if keep is None else keep(record)
            if verdict > 0:
                self.report.add(record)
            elif verdict < 0 and record.event == START:
                self.report.note_start(record)

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

    @staticmethod
    def _rid(raw: bytes, text: bool) -> str:
        if not text or (raw[:1].isalpha() and raw.lower() not in (b"true", b"false")):
            return raw.decode("utf-8", "replace")      # convert_value leaves these as they are
        return str(_text_value(raw))

    def _start(self, row: tuple[bytes, ...], text: bool) -> None:
        raw = row[_TEXT_LEN]
        convert = self._text if text else self._json
        self.report.start(self._rid(row[_RID], text), convert(raw) if raw else None)

    def _complete(self, row: tuple[bytes, ...], text: bool) -> None:
        convert = self._text if text else self._json
        fields = {name: convert(row[index]) for name, index in _COMPLETE_FIELDS if row[index]}
        if row[_DURATION_NUM]:
            fields["duration_ms"] = float(row[_DURATION_NUM])
        when = None
        if str(fields.get("status", "unknown")) == "failed":
            when = self.parser.stamp(row[_STAMP].decode("utf-8", "replace"), text)
        self.report.complete(self._rid(row[_RID], text), fields, when)

    def _note_times(self, rows: list[tuple[bytes, ...]], text: bool) -> None:
        """The chunk's first and last stamped lines of this format bound its time range."""
        for ordered in (rows, reversed(rows)):
            stamp = next((row[_STAMP] for row in ordered if row[_STAMP]), None)
            if stamp is None:
                return
            when = self.parser.stamp(stamp.decode("utf-8", "replace"), text)
            if when is not None:
                self.report.note_time(when)
