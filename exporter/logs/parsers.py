"""Parse the log contract's two line formats into records.

A line is classified by its first byte, the cheapest test there is: ``{`` starts a JSON record,
a digit may start an IndexTTS text record (``2024-06-12 14:22:38,415 - logger - LEVEL -
event: k=v, ...``), anything else continues the previous record (a traceback line) or is blank.

The pipeline calls :meth:`RecordParser.fields` on the hot path: it returns the level, event and
canonical fields without building a :class:`Record` or parsing the timestamp, which only
analysis and timelines need (:meth:`RecordParser.parse`).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orjson import JSONDecodeError as _JSONError
from orjson import loads as _json_loads

from exporter.config import AliasConfig

__all__ = ["LEVEL_ALIASES", "MalformedLine", "NameTables", "ParsedLine", "Record",
           "RecordParser"]

ParsedLine = tuple[str, str, dict[str, Any]]
"""(level, event, canonical fields) of one record line: what the hot path works with."""
NameTables = tuple[dict[bytes, str], dict[bytes, str]]
"""(events, fields): names as written (aliases included) to canonical names, for the
compiled readers in exporter/analyze/_scan.c."""


class MalformedLine(ValueError):
    """A line that starts like a record but cannot be parsed (bad JSON, JSON not an object)."""


@dataclass(slots=True)
class Record:
    """One log record, whatever its format, with canonical event and field names."""

    time: float | None
    level: str
    logger: str
    event: str
    request_id: str | None
    fields: dict[str, object]
    message: str
    raw: str


_TEXT_HEAD = re.compile(
    r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?)\s+-\s+(\S+)\s+-\s+([A-Za-z]+)\s+-\s?(.*)",
    re.S,
)
# "event: k=v, k2="quoted, with = and ,", k3=86 chars" — the event name, then the pairs.
# The common case in one regex: an upper-case level and a snake_case event with pairs.
_TEXT_EVENT = re.compile(
    r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?\s+-\s+\S+\s+-\s+([A-Z]+)\s+-\s?"
    r"([a-z_][a-z0-9_.]*):\s*([A-Za-z_][\w.]*=.*)",
    re.S,
)
# Event names are snake_case and their body starts with a pair; "ERROR: scipy.fft failed on
# input len=1024" is therefore a free-form message, not an event called ERROR.
_EVENT_BODY = re.compile(r"([a-z_][a-z0-9_.]*):\s*((?:[A-Za-z_][\w.]*=.*)?)", re.S)
_PAIR_SPLIT = re.compile(
    r"""\s*([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^,]*?)\s*(?:,|$)""")
# The same without quote handling, twice as fast: used when the pairs hold no quote at all.
_PAIR_FAST = re.compile(r"([A-Za-z_][\w.]*)=([^,]*)(?:,\s*|$)")
_NUMBER_WITH_UNIT = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:chars?|ms|s|kb|KB|B|bytes|%)?")
_LEVELS = {"WARN": "WARNING", "FATAL": "CRITICAL", "ERR": "ERROR"}
LEVEL_ALIASES = {name.encode(): level for name, level in _LEVELS.items()}
"""The level names a text line's upper-case level is read as (others stay as written)."""
_CANONICAL_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
_LEVEL_KEYS = ("level", "levelname", "severity")
_TIME_KEYS = ("time", "timestamp", "ts", "@timestamp", "asctime")
_MESSAGE_KEYS = ("message", "msg")
_LOGGER_KEYS = ("logger", "name", "logger_name")


def convert_value(raw: str) -> object:
    """A text-format value: unquoted string, int/float (units like ``86 chars`` dropped),
    bool, or the string itself."""
    if not raw:
        return raw
    first = raw[0]
    if first == '"' or first == "'":
        inner = raw[1:-1] if len(raw) > 1 and raw[-1] == first else raw[1:]
        return inner.replace('\\"', '"') if "\\" in inner else inner
    if first.isdigit() or first == "-":
        match = _NUMBER_WITH_UNIT.fullmatch(raw)
        if match:
            number = match.group(1)
            try:
                return float(number) if "." in number else int(number)
            except ValueError:          # more digits than int() converts: not a number
                return raw
        return raw
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return raw


def _first_string(fields: dict[str, Any], keys: tuple[str, ...]) -> str:
    for key in keys:
        value = fields.get(key)
        if type(value) is str:
            return value
    return ""


def normalise_level(level: str) -> str:
    upper = level.upper()
    return _LEVELS.get(upper, upper)


class _TimeParser:
    """Timestamps to Unix seconds; the seconds part is cached because consecutive lines share it
    (strptime would cost more than the rest of the parse)."""

    __slots__ = ("_key", "_value")

    def __init__(self) -> None:
        self._key = ""
        self._value = 0.0

    def text(self, stamp: str) -> float | None:
        """``2024-06-12 14:22:38,415`` in local time."""
        key = stamp[:19]
        if key != self._key:
            try:
                parsed = time.mktime((int(key[0:4]), int(key[5:7]), int(key[8:10]),
                                      int(key[11:13]), int(key[14:16]), int(key[17:19]),
                                      0, 0, -1))
            except (ValueError, OverflowError):
                return None
            self._key, self._value = key, parsed
        fraction = stamp[20:]
        return self._value + (float("0." + fraction) if fraction.isdigit() else 0.0)

    @staticmethod
    def any(value: object) -> float | None:
        """A JSON ``time``: ISO-8601 (naive = local time) or a Unix number."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return float(value)
        if not isinstance(value, str):
            return None
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(",", "."))
        except ValueError:
            return None
        try:
            if parsed.tzinfo is None:
                return time.mktime(parsed.timetuple()) + parsed.microsecond / 1e6
            return calendar.timegm(parsed.utctimetuple()) + parsed.microsecond / 1e6
        except (OverflowError, ValueError):     # e.g. year 1 with a zone east of UTC
            return None


class RecordParser:
    """Turns lines into (level, event, fields) or :class:`Record`, applying the aliases."""

    def __init__(self, aliases: AliasConfig | None = None) -> None:
        aliases = aliases or AliasConfig()
        self.field_names: dict[str, str] = {}
        for canonical, names in aliases.fields.items():
            for name in names:
                self.field_names[name] = canonical
        self.event_names = dict(aliases.events)
        self._aliased = {name: canonical for name, canonical in self.field_names.items()
                         if name != canonical}
        self._alias_keys = frozenset(self._aliased)
        self._times = _TimeParser()

    def name_tables(self, read_fields: Collection[str], events: Iterable[str],
                    reserved: Collection[str] = ()) -> NameTables | None:
        """The event names (``events`` and every alias) and the names of ``read_fields``
        (with their aliases) for a compiled reader, or None where the aliases are ones it
        cannot mirror: a read field's own name aliasing another field, or an alias taken
        from ``reserved`` (names the reader gives another meaning)."""
        fields = {name.encode(): name for name in read_fields}
        for name, canonical in self.field_names.items():
            if name in read_fields and canonical != name:
                return None
            if canonical in read_fields:
                if name in reserved:
                    return None
                fields[name.encode()] = canonical
        names = set(self.event_names).union(events)
        return {name.encode(): self.event_names.get(name, name) for name in names}, fields

    # --- hot path -------------------------------------------------------------------------

    def fields(self, line: str) -> ParsedLine | None:
        """(level, event, canonical fields) of a record line, or None for a
        continuation/blank line. Raises MalformedLine. ``line`` has no line ending."""
        if not line:
            return None
        first = line[0]
        if first == "{":
            return self.json_fields(line)
        if "0" <= first <= "9":
            fast = _TEXT_EVENT.match(line)
            if fast is not None:
                level, name, rest = fast.groups()
                return (_LEVELS.get(level, level), self.event_names.get(name, name),
                        self._pairs(rest))
            head = _TEXT_HEAD.match(line)
            if head is not None:
                return self._text_fields(head.group(3), head.group(4))
        return None

    def json_fields(self, line: str) -> ParsedLine:
        """:meth:`fields` of a line known to start with ``{``."""
        try:
            fields = _json_loads(line)
        except (_JSONError, ValueError, RecursionError) as exc:
            raise MalformedLine(f"not valid JSON: {exc}") from None
        if type(fields) is not dict:
            raise MalformedLine("JSON line is not an object")
        aliased = self._alias_keys.intersection(fields)
        if aliased:
            for key in self._in_line_order(aliased, fields):
                canonical = self._aliased[key]
                if canonical not in fields:
                    fields[canonical] = fields[key]
        level = fields.get("level")
        if type(level) is not str:
            level = normalise_level(_first_string(fields, _LEVEL_KEYS))
        elif level not in _CANONICAL_LEVELS:  # the app's own levels skip normalisation
            level = normalise_level(level)
        event = fields.get("event")
        event = self.event_names.get(event, event) if type(event) is str else ""
        return level, event, fields

    def _text_fields(self, level: str, body: str) -> ParsedLine:
        level = _LEVELS.get(level, level) if level.isupper() else normalise_level(level)
        event_match = _EVENT_BODY.fullmatch(body)
        if event_match is None:
            return level, "", {}
        name, rest = event_match.groups()
        return level, self.event_names.get(name, name), self._pairs(rest)

    def _pairs(self, rest: str) -> dict[str, Any]:
        """``k=v, k2="v, 2"`` → canonical names → raw string values (the pipeline converts the
        few it needs; record() converts them all for analysis and timelines)."""
        if '"' in rest or "'" in rest:
            fields = dict(_PAIR_SPLIT.findall(rest))
        else:
            fields = {key: value.rstrip() for key, value in _PAIR_FAST.findall(rest)} \
                if " ," in rest or rest.endswith(" ") else dict(_PAIR_FAST.findall(rest))
        aliased = self._alias_keys.intersection(fields)
        if aliased:
            names = self._aliased
            for key in self._in_line_order(aliased, fields):
                value = fields.pop(key)
                fields.setdefault(names[key], value)
        return fields

    @staticmethod
    def _in_line_order(aliased: frozenset[str], fields: dict[str, Any]) -> Iterable[str]:
        """``aliased`` (keys of ``fields``) in the order the line gives them: of two aliases of
        one field the first wins, whatever the process's string hash seed."""
        return aliased if len(aliased) == 1 else [key for key in fields if key in aliased]

    # --- full records (analysis, timelines) --------------------------------------------------

    def stamp(self, value: str, text_format: bool) -> float | None:
        """A timestamp as :meth:`record` reads it: the text head's (local time) or a JSON
        ``time`` value (for analyze's chunk scanner, which captures the raw stamp)."""
        return self._times.text(value) if text_format else self._times.any(value)

    def parse(self, line: bytes) -> Record | None:
        """A :class:`Record` for a line that starts one, None for a continuation or blank line;
        MalformedLine for a line that starts like a record but cannot be parsed."""
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        parsed = self.fields(text)
        if parsed is None:
            return None
        return self.record(text, parsed)

    def record(self, text: str, parsed: ParsedLine) -> Record:
        """The full record of a line that :meth:`fields` parsed (timestamp, logger, message,
        typed values)."""
        level, event, fields = parsed
        stamp: float | None = None
        if text[0] == "{":
            for key in _TIME_KEYS:
                if key in fields:
                    stamp = self._times.any(fields[key])
                    break
            logger = _first_string(fields, _LOGGER_KEYS)
            message = _first_string(fields, _MESSAGE_KEYS)
        else:
            head = _TEXT_HEAD.match(text)
            logger = message = ""
            if head is not None:
                stamp = self._times.text(head.group(1))
                logger = head.group(2)
                message = "" if event else head.group(4)
            fields = {key: convert_value(value) for key, value in fields.items()}
        request_id = fields.get("id")
        return Record(stamp, level, logger, event,
                      None if request_id is None else str(request_id), fields, message, text)
