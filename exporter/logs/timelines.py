"""Recent request timelines, kept live for ``GET /requests/{id}`` and ``GET /requests``.

The pipeline calls :meth:`TimelineStore.add` for every record line (its ``on_record`` hook), so an
exemplar's request id on a duration histogram resolves to what that request did. Memory is
bounded twice: at most ``capacity`` requests (least recently updated dropped first) and at most
``max_records_per_request`` records each (the oldest dropped, counted in ``dropped``).
The same :func:`timeline_dict` renders ``tts-exporter analyze --id``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from exporter.config import Config
from exporter.logs.parsers import ParsedLine, Record, RecordParser, convert_value

_ENVELOPE = frozenset({"time", "level", "logger", "event", "request_id", "id", "traceback"})


def request_status(records: Iterable[Record]) -> str:
    """success|failed from synthesis_complete, else from the HTTP status, else in_progress."""
    status = "in_progress"
    for record in records:
        if record.event == "synthesis_complete":
            return str(record.fields.get("status", "unknown"))
        if record.event == "http_request":
            status = _http_status(record.fields.get("status"))
    return status


def timeline_dict(request_id: str, records: list[Record], dropped: int = 0) -> dict[str, Any]:
    """One request's records with offsets from its first timestamp, stages and errors."""
    start = next((r.time for r in records if r.time is not None), None)
    entries, stages, errors = [], [], []
    complete: dict[str, Any] | None = None
    for record in records:
        offset = (round((record.time - start) * 1000, 3)
                  if record.time is not None and start is not None else None)
        fields = {k: v for k, v in record.fields.items() if k not in _ENVELOPE}
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
                           "message": record.message or record.raw[-200:]})
        if record.event == "synthesis_complete":
            complete = fields
    end = next((r.time for r in reversed(records) if r.time is not None), None)
    return {"request_id": request_id, "status": request_status(records), "start": start,
            "end": end, "span_ms": round((end - start) * 1000, 3)
            if start is not None and end is not None else None,
            "duration_ms": complete.get("duration_ms") if complete else None,
            "stages": stages, "errors": errors, "records": entries, "dropped_records": dropped}


class _Timeline:
    __slots__ = ("dropped", "lines", "status", "updated")

    def __init__(self, limit: int) -> None:
        self.lines: deque[tuple[str, ParsedLine]] = deque(maxlen=limit)
        self.dropped = 0
        self.status = "in_progress"
        self.updated = 0.0


class TimelineStore:
    """Bounded LRU of recent request timelines, fed line by line from the tailer's thread and
    read from the HTTP handlers, hence the lock.

    It keeps each record's line and the fields the pipeline already parsed; timestamps, value
    conversion and :class:`Record` objects are made only when a timeline is read, so the
    tailer's per-line cost is a dict lookup and an append."""

    def __init__(self, capacity: int = 2000, max_records_per_request: int = 64,
                 clock: Callable[[], float] = time.time,
                 parser: RecordParser | None = None) -> None:
        self.capacity = capacity
        self.max_records = max_records_per_request
        self._clock = clock
        # Its own parser: the pipeline's caches its timestamp state on the tailer's thread.
        self._parser = parser or RecordParser()
        self._items: OrderedDict[str, _Timeline] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, source: str, line: str, parsed: ParsedLine) -> None:
        """Pipeline ``on_record`` hook; records without a request id are ignored."""
        _, event, fields = parsed
        rid = fields.get("id")
        if not rid:
            return
        rid = str(rid)
        with self._lock:
            item = self._items.get(rid)
            if item is None:
                item = self._items[rid] = _Timeline(self.max_records)
                if len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(rid)
            if len(item.lines) == self.max_records:
                item.dropped += 1
            item.lines.append((line, parsed))
            item.updated = self._clock()
            if event == "synthesis_complete":
                item.status = str(convert_value(str(fields.get("status", "unknown"))))
            elif event == "http_request" and item.status == "in_progress":
                item.status = _http_status(fields.get("status"))

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._items.get(request_id)
            if item is None:
                return None
            lines, dropped = list(item.lines), item.dropped
        records = [self._parser.record(line, parsed) for line, parsed in lines]
        return timeline_dict(request_id, records, dropped)

    def recent(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest (most recently updated) first, optionally only one status."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for rid in reversed(self._items):
                item = self._items[rid]
                if status is not None and item.status != status:
                    continue
                out.append({"request_id": rid, "status": item.status, "updated": item.updated,
                            "records": len(item.lines)})
                if len(out) >= limit:
                    break
        return out


def _http_status(code: object) -> str:
    """success|failed from an HTTP status as logged (int in JSON, text in the text format)."""
    try:
        return "failed" if int(str(code)) >= 400 else "success"
    except ValueError:
        return "in_progress"


class TimelineComponent:
    """Sidecar component serving the store over HTTP (no background work of its own)."""

    def __init__(self, store: TimelineStore) -> None:
        self.store = store
        self.routes = [web.get("/requests", self._list), web.get("/requests/{id}", self._one)]

    @classmethod
    def from_config(cls, config: Config) -> TimelineComponent:
        """From the ``timelines`` section, with the log section's aliases."""
        t = config.timelines
        return cls(TimelineStore(t.capacity, t.max_records_per_request,
                                 parser=RecordParser(config.logs.aliases)))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def _one(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        timeline = self.store.get(rid)
        if timeline is None:
            return web.json_response({"error": "unknown request id", "request_id": rid},
                                     status=404)
        return web.json_response(timeline)

    async def _list(self, request: web.Request) -> web.Response:
        status = request.query.get("status") or None
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        if limit < 1:
            return web.json_response({"error": "limit must be >= 1"}, status=400)
        limit = min(limit, self.store.capacity)
        return web.json_response({"requests": self.store.recent(status, limit)})
