"""The gateway layer: the reverse proxy's JSON access log into ``tts_gateway_*`` metrics, and
the router that sends each tailed file to the pipeline of its format.

The format is the one ``config/nginx/tts.conf`` defines (``log_format tts_gateway
escape=json``): one JSON object a line, every value a string, keys named after nginx's
variables::

    {"event":"gateway_request","time":"2026-11-22T10:00:01+00:00","request_id":"4f1c…",
     "method":"POST","uri":"/v1/tts","status":"502","upstream_status":"502, 200",
     "request_time":"0.312","upstream_response_time":"0.012, 0.300",
     "upstream_connect_time":"0.001, 0.001","body_bytes_sent":"5120",
     "upstream_addr":"10.0.0.1:8080, 10.0.0.2:8080"}

The upstream fields hold one value per upstream tried: ``", "`` between the servers of one
upstream group (a retry), ``" : "`` between groups (an internal redirect), ``"-"`` for a try
that got no answer and for a request no upstream saw. The upstream's code is the last
answer's; the upstream time is all tries together (what the client waited on upstreams).

The gateway writes ``$request_id`` into its line and passes it upstream as ``X-Request-ID``,
which the app adopts: kept lines go to the same ``on_records`` hook as the app's, so
``/requests/{id}`` and ``analyze --id`` show both sides of one request.

Every line gets one ``tts_exporter_log_lines_total{outcome}`` as the app's lines do
(``parsed``, ``continuation`` for a blank line, ``malformed``, ``invalid_field``, ``error``).
"""

from __future__ import annotations

import logging
import re
from fnmatch import fnmatch
from typing import Any

from orjson import JSONDecodeError, loads

from exporter.config import LogFormat, LogsConfig, MetricsConfig
from exporter.logs.pipeline import (
    InvalidField,
    KeptLine,
    LogPipeline,
    RecordCallback,
    _label,
    _number,
    _raw_label,
)
from exporter.logs.tailer import ChunkSink
from exporter.metrics import SidecarMetrics

log = logging.getLogger("exporter.logs.gateway")

GATEWAY_EVENT = "gateway_request"
_TRIES = re.compile(r"\s*[,:]\s*")
_NO_BODY_CODES = frozenset({"204", "304"})
MAX_ROUTED_SOURCES = 4096
"""Files whose format is remembered; past it the memory starts over (the tailer follows far
fewer files, and :meth:`SourceRouter.forget` drops the ones it lets go)."""


def upstream_tries(value: object, name: str) -> list[str]:
    """The values of a multi-value upstream field, one per try that got an answer."""
    if value is None:
        return []
    if type(value) is int or type(value) is float:
        return [str(value)]
    if type(value) is not str:
        raise InvalidField(name)
    return [v for v in _TRIES.split(value.strip()) if v and v != "-"]


def upstream_seconds(fields: dict[str, Any]) -> float | None:
    """``upstream_response_time`` of all tries together; None when no upstream answered."""
    tries = upstream_tries(fields.get("upstream_response_time"), "upstream_response_time")
    if not tries:
        return None
    name = "upstream_response_time"
    return sum(_number({name: t}, name) or 0.0 for t in tries)


class GatewayPipeline:
    """Maps the gateway's access-log lines onto :class:`SidecarMetrics` (a :class:`ChunkSink`).

    Its label caps are the ones :meth:`SidecarMetrics.limit_log_labels` set, so it is built
    after the :class:`LogPipeline` (see :func:`log_sink`)."""

    def __init__(self, metrics: SidecarMetrics, on_records: RecordCallback | None = None) -> None:
        self.metrics = metrics
        self.on_records = on_records
        self._code, self._upstream_code = metrics.gateway_requests.caps

    def process(self, source: str, data: bytes) -> None:
        """Count every complete line in ``data`` (caller holds the metrics lock)."""
        counts = {"parsed": 0, "continuation": 0, "malformed": 0, "invalid_field": 0,
                  "error": 0}
        keep: list[KeptLine] = []
        for line in data.decode("utf-8", "replace").splitlines():
            outcome = self._line(source, line, keep)
            counts[outcome] += 1
        if keep and self.on_records is not None:
            self.on_records(source, keep)
        for outcome, count in counts.items():
            if count:
                self.metrics.log_lines.inc((outcome,), count)

    def _line(self, source: str, line: str, keep: list[KeptLine]) -> str:
        if not line.strip():
            return "continuation"
        try:
            fields = loads(line)
        except (JSONDecodeError, ValueError, RecursionError):
            return "malformed"
        if type(fields) is not dict:
            return "malformed"
        try:
            self._request(fields)
        except InvalidField:
            return "invalid_field"
        except Exception:  # a bug must cost one line, not the batch or the tailer
            log.exception("gateway log line from %s could not be counted", source)
            return "error"
        request_id = fields.get("request_id")
        if request_id and self.on_records is not None:
            keep.append((request_id, GATEWAY_EVENT, line, fields.get("status")))
        return "parsed"

    def _request(self, fields: dict[str, Any]) -> None:
        """One request: every check (which may raise InvalidField) before any update."""
        code = _raw_label(fields.get("status") or None, "status", "unknown")
        upstream_codes = upstream_tries(fields.get("upstream_status"), "upstream_status")
        upstream_code = _raw_label(upstream_codes[-1], "upstream_status", "none") \
            if upstream_codes else "none"
        request_s = _number(fields, "request_time")
        upstream_s = upstream_seconds(fields)
        body = _number(fields, "body_bytes_sent")
        method = fields.get("method")
        m = self.metrics
        code_label = _label(self._code, code)
        m.gateway_requests.inc((code_label, _label(self._upstream_code, upstream_code)))
        if request_s is not None:
            m.gateway_duration.observe((), request_s, fields.get("request_id"))
        if upstream_s is not None:
            m.gateway_upstream_duration.observe((), upstream_s, fields.get("request_id"))
        if body == 0 and method != "HEAD" and str(code) not in _NO_BODY_CODES:
            m.gateway_empty.inc(())


def detect_format(data: bytes) -> LogFormat | None:
    """``gateway`` or ``app`` from the first non-blank line of a file (None: no line yet).
    Only a fallback for files no ``logs.sources`` entry names: both formats start with ``{``,
    so the gateway's is recognised by its upstream fields and the absence of an app event."""
    for raw in data.split(b"\n", 64)[:64]:
        line = raw.strip()
        if not line:
            continue
        if line[:1] == b"{":
            try:
                fields = loads(line)
            except (JSONDecodeError, ValueError, RecursionError):
                return "app"
            if isinstance(fields, dict) and "upstream_status" in fields \
                    and fields.get("event", GATEWAY_EVENT) == GATEWAY_EVENT:
                return "gateway"
        return "app"
    return None


class SourceRouter:
    """The tailer's :class:`LineSink`, sending each file to the pipeline of its format: the first
    ``logs.sources``/``logs.paths`` glob it matches decides, ``auto`` by
    :func:`detect_format` on its first line."""

    def __init__(self, formats: list[tuple[str, LogFormat]], app: ChunkSink,
                 gateway: ChunkSink) -> None:
        self.formats = formats
        self.sinks: dict[LogFormat, ChunkSink] = {"app": app, "gateway": gateway}
        self._by_source: dict[str, ChunkSink] = {}

    def format_of(self, source: str) -> LogFormat:
        return next((fmt for pattern, fmt in self.formats if fnmatch(source, pattern)), "auto")

    def process(self, source: str, data: bytes) -> None:
        sink = self._by_source.get(source)
        if sink is None:
            fmt = self.format_of(source)
            known = detect_format(data) if fmt == "auto" else fmt
            sink = self.sinks[known or "app"]
            if known is not None:           # blank lines only: decide on the next chunk
                if len(self._by_source) >= MAX_ROUTED_SOURCES:
                    self._by_source.clear()
                self._by_source[source] = sink
        sink.process(source, data)

    def forget(self, source: str) -> None:
        self._by_source.pop(source, None)


def log_sink(metrics: SidecarMetrics, logs: LogsConfig, metrics_config: MetricsConfig,
             on_records: RecordCallback | None = None, count_restarts: bool = True) \
        -> SourceRouter:
    """The sidecar's sink for tailed lines: the app's pipeline and the gateway's, by file."""
    app = LogPipeline(metrics, logs, metrics_config, on_records=on_records,
                      count_restarts=count_restarts)
    return SourceRouter(logs.formats(), app, GatewayPipeline(metrics, on_records))
