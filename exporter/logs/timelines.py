"""Recent request timelines, kept live for ``GET /requests/{id}`` and ``GET /requests``.

The pipeline hands :meth:`TimelineStore.add` the record lines of each chunk that carry a
request id (its ``on_records`` hook), so an exemplar's request id on a duration histogram
resolves to what that request did. Memory is bounded by the number of lines kept.
The same :func:`timeline_dict` renders ``tts-exporter analyze --id``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from exporter.config import Config
from exporter.logs.parsers import Record, RecordParser, convert_value
from exporter.logs.pipeline import KeptLine

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


class TimelineStore:
    """The newest record lines that carry a request id, in one ring; timelines are grouped
    from it when they are read.

    The tailer's thread only extends the ring (``deque.extend``, once per chunk); the pipeline
    pays one small tuple per kept line (about 15 % of live throughput, measured with
    tests/bench/bench_logs.py), and reading one request
    scans the ring (milliseconds for the default 10,000 lines) and parses its few lines again.
    Memory is bounded by ``max_lines`` (lines of ~250 bytes), and a timeline shows at most its
    newest ``max_records_per_request`` records, counting the rest as dropped.
    """

    def __init__(self, max_lines: int = 10_000, max_records_per_request: int = 64,
                 parser: RecordParser | None = None) -> None:
        self.max_lines = max_lines
        self.max_records = max_records_per_request
        # Its own parser: the pipeline's caches timestamp state on the tailer's thread.
        self._parser = parser or RecordParser()
        self._ring: deque[KeptLine] = deque(maxlen=max_lines)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, source: str, batch: list[KeptLine]) -> None:
        """The pipeline's ``on_records`` hook: record lines with a request id, in log order."""
        with self._lock:
            self._ring.extend(batch)

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
        return timeline_dict(request_id, self._records(lines[dropped:]), dropped)

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
    """Sidecar component serving the store over HTTP (no background work of its own)."""

    def __init__(self, store: TimelineStore) -> None:
        self.store = store
        self.routes = [web.get("/requests", self._list), web.get("/requests/{id}", self._one)]

    @classmethod
    def from_config(cls, config: Config) -> TimelineComponent:
        """From the ``timelines`` section, with the log section's aliases."""
        t = config.timelines
        return cls(TimelineStore(t.max_lines, t.max_records_per_request,
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
        return web.json_response({"requests": self.store.recent(status, limit)})
