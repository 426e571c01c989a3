"""Recent request timelines, kept live for ``GET /requests/{id}`` and ``GET /requests``.

The pipeline hands :meth:`TimelineStore.add` the record lines of each chunk that carry a
request id (its ``on_records`` hook), so an exemplar's request id on a duration histogram
resolves to what that request did. Memory is bounded in lines and in bytes; lines longer than
a bound are kept shortened. The same :func:`timeline_dict` renders ``tts-exporter analyze --id``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import deque
from collections.abc import Iterable
from operator import add, itemgetter
from typing import Any

from aiohttp import web

from exporter.config import Config, TimelinesConfig
from exporter.logs.parsers import Record, RecordParser, convert_value
from exporter.logs.pipeline import KeptLine
from exporter.server import OFF_LOOP

_ID, _LINE = itemgetter(0), itemgetter(2)
_ENVELOPE = frozenset({"time", "level", "logger", "event", "request_id", "id", "traceback"})


def request_status(records: Iterable[Record]) -> str:
    """The status of the newest synthesis_complete, else success|failed from the newest
    http_request, else in_progress."""
    summary = _Summary("")
    for record in reversed(list(records)):
        summary.note(record.event, record.fields.get("status"))
    return summary.status()


def timeline_dict(request_id: str, records: list[Record], dropped: int = 0) -> dict[str, Any]:
    """One request's records with offsets from its first timestamp, stages and errors."""
    start = next((r.time for r in records if r.time is not None), None)
    entries, stages, errors = [], [], []
    complete: dict[str, Any] | None = None
    for record in records:
        offset = (round((record.time - start) * 1000, 3)
                  if record.time is not None and start is not None else None)
        fields = {k: v for k, v in record.fields.items() if k not in _ENVELOPE}
        if "text" in fields:     # what a client asked to have spoken is theirs, not on-call's
            text = fields.pop("text")
            fields.setdefault("text_len", len(text) if isinstance(text, str) else None)
        entry: dict[str, Any] = {"time": record.time, "offset_ms": offset, "level": record.level,
                                 "event": record.event, "fields": fields,
                                 "message": record.message}
        tb = record.fields.get("traceback")
        if isinstance(tb, list) and tb:
            entry["traceback"] = list(tb)
        entries.append(entry)
        if record.event == "stage_time":
            stages.append({"stage": fields.get("stage"), "duration_ms": fields.get("duration_ms"),
                           "offset_ms": offset})
        if record.level in ("ERROR", "CRITICAL") or ("error_code" in fields and \
                fields.get("error_code") not in (None, "none")):
            errors.append({"offset_ms": offset, "event": record.event,
                           "error_code": fields.get("error_code"),
                           "message": record.message or (
                               None if "text" in record.fields else record.raw[-200:])})
        if record.event == "synthesis_complete":
            complete = fields
    end = next((r.time for r in reversed(records) if r.time is not None), None)
    return {"request_id": request_id, "status": request_status(records), "start": start,
            "end": end, "span_ms": round((end - start) * 1000, 3)
            if start is not None and end is not None else None,
            "duration_ms": complete.get("duration_ms") if complete else None,
            "stages": stages, "errors": errors, "records": entries, "dropped_records": dropped}


_ENTRY_BYTES = 120
"""What one kept line costs besides its line and id objects: the tuple, the ring slots."""
_VALUE_CHARS = 200
"""A string value of a shortened JSON line keeps this many characters."""
_ID_CHARS = 128
"""Request ids are kept (and matched) up to this many characters."""


def shorten_line(line: str, max_chars: int) -> str:
    """A line of at most ``max_chars`` characters that still parses as the same kind of record.

    A JSON line keeps its keys with long string values cut (``…`` marks the cut) and other long
    values replaced by a cut of their JSON text; fields past the bound are left out. A text
    line is cut at the bound (its key=value parser reads what is left).
    """
    if len(line) <= max_chars:
        return line
    if line[0] != "{":
        return line[:max_chars]
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError):
        return line[:max_chars]
    if type(fields) is not dict:
        return line[:max_chars]
    kept: dict[str, Any] = {}
    size = 2
    for key, value in fields.items():
        key = str(key)[:_VALUE_CHARS]
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            value = json.dumps(value)
        if isinstance(value, str) and len(value) > _VALUE_CHARS:
            value = value[:_VALUE_CHARS] + "…"
        item = len(json.dumps({key: value}, ensure_ascii=False))
        if size + item > max_chars:
            kept["truncated"] = True
            break
        kept[key] = value
        size += item
    return json.dumps(kept, ensure_ascii=False)[:max_chars]


class TimelineStore:
    """The newest record lines that carry a request id, in one ring; timelines are grouped
    from it when they are read.

    The tailer's thread only extends the ring (once per chunk); the pipeline pays one small
    tuple per kept line, and reading one request scans the ring (milliseconds for 10,000 lines)
    and parses its few lines again. Memory is bounded by ``max_lines`` and by ``max_bytes``
    (the oldest lines go first); a line over ``max_line_chars`` characters is kept shortened
    (:func:`shorten_line`) and an id over 128 characters cut. A timeline shows at most its
    newest ``max_records_per_request`` records, counting the rest as dropped, and only the
    ``fields`` of an allow-list when one is given.
    """

    def __init__(self, max_lines: int = 10_000, max_records_per_request: int = 64,
                 parser: RecordParser | None = None, max_bytes: int = 4 << 20,
                 max_line_chars: int = 2048, fields: Iterable[str] = ()) -> None:
        self.max_lines = max_lines
        self.max_records = max_records_per_request
        self.max_bytes = max_bytes
        self.max_line_chars = max_line_chars
        self.fields = frozenset(fields)
        # Its own parser: the pipeline's caches timestamp state on the tailer's thread.
        self._parser = parser or RecordParser()
        self._ring: deque[KeptLine] = deque()
        self._costs: deque[int] = deque()   # bytes each kept line's line and id hold
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, t: TimelinesConfig, parser: RecordParser) -> TimelineStore:
        return cls(t.max_lines, t.max_records_per_request, parser, t.max_bytes,
                   t.max_line_chars, t.fields)

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def bytes(self) -> int:
        """The memory the kept lines hold, as the bound counts it."""
        return self._bytes

    def add(self, source: str, batch: list[KeptLine]) -> None:
        """The pipeline's ``on_records`` hook: record lines with a request id, in log order."""
        if len(batch) > self.max_lines:  # the older ones would leave the ring at once
            batch = batch[-self.max_lines:]
        if not batch:
            return
        # The whole batch at C speed where nothing needs shortening (the common case).
        lines, ids = [*map(_LINE, batch)], [*map(_ID, batch)]
        try:
            short = max(map(len, lines)) <= self.max_line_chars \
                and max(map(len, ids)) <= _ID_CHARS
        except TypeError:  # an id that is a number (JSON)
            short = False
        if not short:
            batch = [self._bounded(kept) for kept in batch]
            lines, ids = [*map(_LINE, batch)], [*map(_ID, batch)]
        costs = [*map(add, map(sys.getsizeof, lines), map(sys.getsizeof, ids))]
        with self._lock:
            self._ring.extend(batch)
            self._costs.extend(costs)
            self._bytes += sum(costs) + _ENTRY_BYTES * len(costs)
            ring, held = self._ring, self._costs
            while ring and (len(ring) > self.max_lines or self._bytes > self.max_bytes):
                ring.popleft()
                self._bytes -= held.popleft() + _ENTRY_BYTES

    def _bounded(self, kept: KeptLine) -> KeptLine:
        """``kept`` with its line shortened and its id cut where they are over the bounds."""
        rid, event, line, status = kept
        if len(line) > self.max_line_chars or (type(rid) is str and len(rid) > _ID_CHARS):
            rid = rid[:_ID_CHARS] if type(rid) is str else rid
            return rid, event, shorten_line(line, self.max_line_chars), status
        return kept

    def _snapshot(self) -> list[KeptLine]:
        with self._lock:
            return list(self._ring)

    def _records(self, lines: list[str]) -> list[Record]:
        parse = self._parser.fields
        return [self._parser.record(line, parsed) for line in lines
                if (parsed := parse(line)) is not None]

    def get(self, request_id: str) -> dict[str, Any] | None:
        lines = [line for rid, _, line, _ in self._snapshot() if _id_key(rid) == request_id]
        if not lines:
            return None
        dropped = max(0, len(lines) - self.max_records)
        timeline = timeline_dict(request_id, self._records(lines[dropped:]), dropped)
        return self._allowed(timeline) if self.fields else timeline

    def _allowed(self, timeline: dict[str, Any]) -> dict[str, Any]:
        """Only the allow-listed fields; the free-text parts (message, traceback) only when
        the list names them."""
        allowed = self.fields
        for entry in timeline["records"]:
            entry["fields"] = {k: v for k, v in entry["fields"].items() if k in allowed}
            if "message" not in allowed:
                entry["message"] = ""
            if "traceback" not in allowed:
                entry.pop("traceback", None)
        if "message" not in allowed:
            for error in timeline["errors"]:
                error["message"] = ""
        if "duration_ms" not in allowed:
            timeline["duration_ms"] = None
        return timeline

    def recent(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Requests newest first (by their last record), optionally only one status;
        ``updated`` is the time of the request's last record."""
        seen: dict[str, _Summary] = {}
        for rid, event, line, field in reversed(self._snapshot()):
            key = _id_key(rid)
            summary = seen.get(key)
            if summary is None:
                summary = seen[key] = _Summary(line)
            summary.records += 1
            summary.note(event, field)
        out: list[dict[str, Any]] = []
        for rid, summary in seen.items():
            state = summary.status()
            if status is None or state == status:
                out.append({"request_id": rid, "status": state,
                            "updated": self._time_of(summary.last_line),
                            "records": summary.records})
                if len(out) >= limit:
                    break
        return out

    def _time_of(self, line: str) -> float | None:
        records = self._records([line])
        return records[0].time if records else None


class _Summary:
    """One request's status, fed its records newest first: the newest synthesis_complete
    decides it, else the newest http_request."""

    __slots__ = ("completed", "http", "last_line", "records")

    def __init__(self, last_line: str) -> None:
        self.last_line = last_line
        self.records = 0
        self.completed: str | None = None
        self.http: str | None = None

    def note(self, event: str, field: object) -> None:
        if event == "synthesis_complete" and self.completed is None:
            self.completed = "unknown" if field is None else str(convert_value(str(field)))
        elif event == "http_request" and self.http is None:
            self.http = _http_status(field)

    def status(self) -> str:
        return self.completed or self.http or "in_progress"


def _id_key(logged: object) -> str:
    """Request ids as text (a JSON log may write them as numbers)."""
    return logged if type(logged) is str else str(logged)


def _http_status(code: object) -> str:
    """success|failed from an HTTP status as logged (int in JSON, text in the text format)."""
    try:
        return "failed" if int(str(code)) >= 400 else "success"
    except ValueError:
        return "in_progress"


class TimelineComponent:
    """Sidecar component serving the store over HTTP (no background work of its own). Reads
    scan the whole store, so they run on the server's worker thread, never on the loop."""

    def __init__(self, store: TimelineStore, max_list_limit: int = 1000) -> None:
        self.store = store
        self.max_list_limit = max_list_limit
        self.routes = [web.get("/requests", self._list), web.get("/requests/{id}", self._one)]

    @classmethod
    def from_config(cls, config: Config) -> TimelineComponent:
        """From the ``timelines`` section, with the log section's aliases."""
        t = config.timelines
        return cls(TimelineStore.from_config(t, RecordParser(config.logs.aliases)),
                   t.max_list_limit)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def _one(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        timeline = await request.app[OFF_LOOP].run(lambda: self.store.get(rid))
        if timeline is None:
            return web.json_response({"error": "unknown request id",
                                      "request_id": rid[:_ID_CHARS]}, status=404)
        return web.json_response(timeline)

    async def _list(self, request: web.Request) -> web.Response:
        """``?status=&limit=``: limit must be a whole number >= 1; above ``max_list_limit``
        it is capped (the answer's ``limit`` says what was applied)."""
        status = request.query.get("status") or None
        raw = request.query.get("limit", "50")
        if not (raw.isascii() and raw.isdigit()):
            return web.json_response({"error": "limit must be a whole number >= 1"},
                                     status=400)
        # More than 9 significant digits is past any cap; int() of it would be wasted work.
        limit = self.max_list_limit if len(raw.lstrip("0")) > 9 else \
            min(int(raw), self.max_list_limit)
        if limit < 1:
            return web.json_response({"error": "limit must be a whole number >= 1"},
                                     status=400)
        requests = await request.app[OFF_LOOP].run(lambda: self.store.recent(status, limit))
        return web.json_response({"requests": requests, "limit": limit})
