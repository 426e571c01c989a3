"""Log lines → metrics: the service and business layers, from what the TTS service logs.

The tailer hands :meth:`LogPipeline.process` whole batches of complete lines (up to a read
chunk, typically 1 MiB) while it holds the metric set's lock, so the per-line cost is one
decode-free split, one parse and a few dict updates — no locks, no prometheus_client calls.

Every line gets exactly one ``tts_exporter_log_lines_total{outcome}``:

- ``parsed``: a record of an event this pipeline maps to metrics;
- ``unknown_event``: a record with an event name it does not know (still counted by level);
- ``free_form``: a record without an event (``ERROR: scipy.fft failed ...``);
- ``continuation``: a line that continues the previous record (tracebacks) or is blank;
- ``malformed``: a line that starts like a record but does not parse (broken JSON);
- ``invalid_field``: a known event whose numeric field is not a number (no metric changes);
- ``too_long``: counted by the tailer, which skips lines over ``logs.max_line_bytes``.

WARNING and above count in ``tts_log_records_total{level,code}`` whatever the outcome.

Event semantics worth knowing: every ``synthesis_complete`` is one cache lookup (the app looks
the cache up before synthesising, so failures looked it up too); ``synthesis_seconds`` and
``audio_seconds`` only grow for successful syntheses that were not cache hits, so their ratio
is the model's real-time factor; label values from logs go through one :class:`LabelCap` per
label (``route``, ``method``, ``status`` for HTTP codes and synthesis statuses, ``error_code``,
``stage``, ``code`` for log-record codes), overflows counting in
``tts_exporter_label_overflow_total{label}``. Continuation lines (tracebacks) change no metric,
so no per-source state is needed and :meth:`LogPipeline.forget` has nothing to drop;
``on_records`` receives, once per chunk, the record lines that carry a request id (not their
tracebacks) with their id, event and status; ``RecordParser`` parses them again when needed.
"""

from __future__ import annotations

from collections.abc import Callable
from math import isfinite
from typing import Any

from exporter.config import LogsConfig, MetricsConfig
from exporter.logs.parsers import MalformedLine, RecordParser, convert_value
from exporter.metrics import OVERFLOW_LABEL_VALUE, LabelCap, SidecarMetrics

KeptLine = tuple[object, str, str, object]
"""(request id, event, line, status field) of a record line that carries a request id."""
RecordCallback = Callable[[str, list[KeptLine]], None]
"""``on_records(source, kept_lines)``: once per processed chunk. Only these four values are
kept, not the parsed fields: holding a chunk's dicts until its end costs the tailer more than
parsing a request's few lines again when its timeline is read."""

LABELS = ("route", "method", "code", "status", "error_code", "stage")
_COUNTED_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
_TRUE = frozenset({True, "true", "True", "1", "yes"})


class InvalidField(ValueError):
    """A field an event needs is missing its number."""


def _number(fields: dict[str, Any], name: str) -> float | None:
    value = fields.get(name)
    kind = type(value)
    if kind is int or kind is float:
        return value
    if value is None:
        return None
    text = value if kind is str else str(value)
    try:
        number = float(text)  # text format: "523"
    except ValueError:
        try:
            number = float(text.split()[0])  # "86 chars"
        except (ValueError, IndexError):
            raise InvalidField(name) from None
    if not isfinite(number):   # "nan", "inf", 400 digits: one line must not poison a _sum
        raise InvalidField(name)
    return number


def _flag(fields: dict[str, Any], name: str) -> bool:
    return fields.get(name) in _TRUE


class LogPipeline:
    """Maps parsed records onto :class:`SidecarMetrics`; one instance per sidecar."""

    def __init__(
        self,
        metrics: SidecarMetrics,
        logs: LogsConfig,
        metrics_config: MetricsConfig,
        on_records: RecordCallback | None = None,
        count_restarts: bool = True,
    ) -> None:
        self.metrics = metrics
        self.parser = RecordParser(logs.aliases)
        self.on_records = on_records
        self.count_restarts = count_restarts
        cap = metrics_config.label_value_cap
        self._caps = {label: LabelCap(cap) for label in LABELS}
        # value -> capped label value, per label: one dict lookup on the hot path.
        self._seen: dict[str, dict[object, str]] = {label: {} for label in LABELS}
        self._seen_stage = self._seen["stage"]
        self._handlers: dict[str, Callable[[dict[str, Any], Any], None]] = {
            "http_request": self._http_request,
            "synthesis_complete": self._synthesis_complete,
            "synthesis_start": self._noop,
            "stage_time": self._stage_time,
            "first_audio": self._first_audio,
            "audio_metrics": self._audio_metrics,
            "service_start": self._service_start,
            "cache_health": self._noop,
            "cache_dir_usage": self._noop,
        }

    def forget(self, source: str) -> None:
        """Nothing is kept per source: records are complete on their first line."""

    def process(self, source: str, data: bytes) -> None:
        """Count every complete line in ``data`` (caller holds the metrics lock)."""
        text = data.decode("utf-8", "replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        parsed_lines = continuation = malformed = 0
        other: dict[str, int] = {}
        fields_of = self.parser.fields
        json_fields = self.parser.json_fields  # most lines: skip fields()' dispatch
        handlers = self._handlers
        on_records = self.on_records
        keep: list[KeptLine] = []
        for line in lines:
            try:
                parsed = json_fields(line) if line[:1] == "{" else fields_of(line)
            except MalformedLine:
                malformed += 1
                continue
            if parsed is None:
                continuation += 1
                continue
            level, event, fields = parsed
            if level in _COUNTED_LEVELS:
                self._count_level(level, fields)
            request_id = fields.get("id")
            if request_id and on_records is not None:
                keep.append((request_id, event, line, fields.get("status")))
            handler = handlers.get(event)
            if handler is not None:
                try:
                    handler(fields, request_id)
                    parsed_lines += 1
                except InvalidField:
                    other["invalid_field"] = other.get("invalid_field", 0) + 1
            else:
                outcome = "unknown_event" if event else "free_form"
                other[outcome] = other.get(outcome, 0) + 1
        if keep and on_records is not None:
            on_records(source, keep)
        other.update(parsed=parsed_lines, continuation=continuation, malformed=malformed)
        inc = self.metrics.log_lines.inc
        for outcome, count in other.items():
            if count:
                inc((outcome,), count)

    # --- label capping ----------------------------------------------------------------------

    def _label(self, label: str, value: object) -> str:
        seen = self._seen[label]
        capped = seen.get(value)
        if capped is not None:
            return capped
        text = str(value)
        if text[:1] in ('"', "'"):
            text = str(convert_value(text))
        capped = self._caps[label](text)
        if capped == OVERFLOW_LABEL_VALUE and text != OVERFLOW_LABEL_VALUE:
            # Not remembered, so every overflowing observation is counted.
            self.metrics.label_overflow.inc((label,))
        else:
            seen[value] = capped
        return capped

    def _count_level(self, level: str, fields: dict[str, Any]) -> None:
        code = fields.get("warning_code") or fields.get("error_code") or "none"
        self.metrics.log_records.inc((level, self._label("code", code)))

    # --- event handlers ---------------------------------------------------------------------

    def _noop(self, fields: dict[str, Any], request_id: str | None) -> None:
        pass

    def _http_request(self, fields: dict[str, Any], request_id: str | None) -> None:
        duration = _number(fields, "duration_ms")
        status = fields.get("status", "")
        route = self._label("route", fields.get("route") or fields.get("endpoint") or "unknown")
        m = self.metrics
        m.http_requests.inc((self._label("method", fields.get("method", "")), route,
                             self._label("status", status)))
        if duration is not None:
            m.http_duration.observe((route,), duration / 1000.0, request_id)

    def _synthesis_complete(self, fields: dict[str, Any], request_id: str | None) -> None:
        duration = _number(fields, "duration_ms")
        text_len = _number(fields, "text_len")
        audio_ms = _number(fields, "audio_duration_ms")
        status = str(fields.get("status", "unknown"))
        success = status == "success"
        error_code = "none" if success else str(fields.get("error_code") or "unknown")
        cache_hit = _flag(fields, "cache_hit")
        m = self.metrics
        m.syntheses.inc((self._label("status", status), self._label("error_code", error_code)))
        m.cache_lookups.inc(())
        if cache_hit:
            m.cache_hits.inc(())
        if _flag(fields, "cache_saved"):
            m.cache_saves.inc(())
        if duration is not None:
            m.synthesis_duration.observe((), duration / 1000.0, request_id)
        if text_len is not None:
            m.text_length.observe((), text_len, request_id)
        if success and not cache_hit and duration is not None and audio_ms is not None:
            m.synthesis_seconds.inc((), duration / 1000.0)
            m.audio_seconds.inc((), audio_ms / 1000.0)

    def _stage_time(self, fields: dict[str, Any], request_id: str | None) -> None:
        # The most frequent event (one per stage per synthesis): the label's cache inlined.
        duration = _number(fields, "duration_ms")
        if duration is not None:
            value = fields.get("stage") or "unknown"
            stage = self._seen_stage.get(value) or self._label("stage", value)
            self.metrics.stage_duration.observe((stage,), duration / 1000.0, request_id)

    def _first_audio(self, fields: dict[str, Any], request_id: str | None) -> None:
        duration = _number(fields, "duration_ms")
        if duration is not None:
            self.metrics.time_to_first_audio.observe((), duration / 1000.0, request_id)

    def _audio_metrics(self, fields: dict[str, Any], request_id: str | None) -> None:
        rms = _number(fields, "rms")
        centroid = _number(fields, "spectral_centroid")
        if rms is not None:
            self.metrics.audio_rms.observe((), rms, request_id)
        if centroid is not None:
            self.metrics.audio_centroid.observe((), centroid, request_id)

    def _service_start(self, fields: dict[str, Any], request_id: str | None) -> None:
        if self.count_restarts:
            self.metrics.app_restarts.inc(())
