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
- ``invalid_field``: a known event with a field it cannot use: a number that is not one, or is
  negative, non-finite or over 1e15 in its unit; a label value (route, status, error code,
  stage, ...) that is a list or an object. Such a line changes no metric at all;
- ``error``: an unexpected failure on one line (logged); the lines around it are unaffected;
- ``too_long``: counted by the tailer, which skips lines over ``logs.max_line_bytes``.

WARNING and above count in ``tts_log_records_total{level,code}`` whatever the outcome, but
``invalid_field``.

Event semantics worth knowing: every ``synthesis_complete`` is one cache lookup (the app looks
the cache up before synthesising, so failures looked it up too); ``synthesis_seconds`` and
``audio_seconds`` only grow for successful syntheses that were not cache hits, so their ratio
is the model's real-time factor; label values from logs go through the :class:`LabelCap` of
their family and label, and each family keeps to its series budget (see ``exporter.metrics``),
overflows counting in ``tts_exporter_label_overflow_total{family,label}``. A ``text`` field
gives only its length (where the line has no ``text_len``); the text itself never reaches a
metric. Syntheses without ``model_version`` count as ``unknown``. Each line is
validated whole before any metric changes, so a line counts completely or not at all.
Continuation lines (tracebacks) change no metric, so no per-source state is needed;
IndexTTS text lines are recognised by compiled code (``Classifier`` in
exporter/analyze/_scan.c, the recogniser analyze's scanner uses), which hands each line whose
shape fixes its meaning to the same handlers as (level, event, fields) — only the fields in
:data:`READ_FIELDS`, numbers already converted where ``float()`` gives the same — so the
per-line regex and dict work is gone; every other line goes through :class:`RecordParser`
in its place, as all lines do where the extension is not built (tests/unit/
test_pipeline_native.py checks that both give identical metrics);
``on_records`` receives, once per chunk, the record lines that carry a request id (not their
tracebacks) with their id, event and status; ``RecordParser`` parses them again when needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from exporter.config import LogsConfig, MetricsConfig
from exporter.logs.parsers import LEVEL_ALIASES, MalformedLine, RecordParser, convert_value
from exporter.metrics import LabelCap, SeriesLimits, SidecarMetrics

if TYPE_CHECKING:
    from exporter.analyze._scan import ClassifiedLine

try:
    from exporter.analyze._scan import Classifier
except ImportError:     # a source tree whose C part was never built: the parser reads every line
    Classifier = None  # type: ignore[assignment,misc]

log = logging.getLogger("exporter.logs.pipeline")

NUMBER_FIELDS = ("duration_ms", "text_len", "audio_duration_ms", "queue_ms", "batch_size",
                 "audio_size_kb", "rms", "spectral_centroid", "used_percent")
"""Fields the handlers read with :func:`_number`."""
LABEL_FIELDS = ("status", "error_code", "warning_code", "model_version", "method", "route",
                "endpoint", "stage", "path", "cache_hit", "cache_saved", "fallback_used")
"""Fields whose few values recur (labels, flags)."""
READ_FIELDS = ("id", "text", *NUMBER_FIELDS, *LABEL_FIELDS)
"""Every field a handler (or ``process``) reads: the only ones the classifier extracts, so a
handler that reads a new field needs it here (tests/unit/test_pipeline_native.py checks)."""

NUMBER, RAW, FLAG = 1, 2, 3
"""What a spec entry extracts: :func:`_number` of the field, its value as it is (None when
absent), :func:`_flag` of it. Numbers: the classifier's own line goes to the handler with its
fields where it cannot vouch for one."""
SYNTHESIS_SPEC = (
    ("duration_ms", NUMBER), ("text_len", NUMBER), ("audio_duration_ms", NUMBER),
    ("queue_ms", NUMBER), ("batch_size", NUMBER), ("audio_size_kb", NUMBER), ("rms", NUMBER),
    ("spectral_centroid", NUMBER), ("text", RAW), ("status", RAW), ("error_code", RAW),
    ("model_version", RAW), ("cache_hit", FLAG), ("cache_saved", FLAG),
    ("fallback_used", FLAG))
"""What ``synthesis_complete`` reads, in :meth:`LogPipeline._count_synthesis`'s order: the
classifier extracts it itself from text lines (the hot path), the handler with
:func:`_extract` from any other line."""

KeptLine = tuple[object, str, str, object]
"""(request id, event, line, status field) of a record line that carries a request id."""
RecordCallback = Callable[[str, list[KeptLine]], None]
"""``on_records(source, kept_lines)``: once per processed chunk. Only these four values are
kept, not the parsed fields: holding a chunk's dicts until its end costs the tailer more than
parsing a request's few lines again when its timeline is read."""

_COUNTED_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
_TRUE = frozenset({True, "true", "True", "1", "yes"})
_LABEL_TYPES = frozenset({str, int, float, bool})
MAX_NUMBER = 1e15
"""Largest number a field may hold, in its own unit (ms, chars, Hz): far beyond anything real,
and small enough that no sum can reach infinity (2**64 observations of it stay below 2e34)."""


APP_ERROR_CODES = frozenset({
    "BAD_REQUEST", "TEXT_EMPTY", "TEXT_TOO_LONG", "BODY_TOO_LARGE", "REQUEST_TIMEOUT",
    "TEXT_INVALID_CHARS", "VOICE_UNKNOWN", "LANG_UNSUPPORTED", "JOB_NOT_FOUND", "NOT_FOUND",
    "METHOD_NOT_ALLOWED", "IDEMPOTENCY_CONFLICT", "QUEUE_FULL", "RATE_LIMITED",
    "INGRESS_CLOSED", "GPU_OOM", "MODEL_ERROR", "MODEL_NOT_READY", "SHUTTING_DOWN", "INTERNAL"})
"""The app's error table (tts_app/errors.py; the sidecar does not import the app, a unit test
keeps the two equal): the values the ``error`` label of tts_http_requests_total may take, with
``none`` (no error code on a success) and ``other`` (anything else), so the rules can tell shed
requests from failed ones without log content choosing label values."""

LENGTH_CLASSES = ((100, "100"), (400, "400"), (2000, "2000"))
"""Upper bounds (characters) of the text length classes of the synthesis latency SLO; longer
texts are ``longer``, a line without ``text_len`` is ``unknown``."""


def error_label(code: object, status: object) -> str:
    """The ``error`` label of an http_request line: its app error code, ``none`` for a line
    without one that did not fail, ``other`` for anything else (never a new value)."""
    if code is None or code == "":
        failed = str(status)[:1] in ("4", "5")
        return "other" if failed else "none"
    return code if isinstance(code, str) and code in APP_ERROR_CODES else "other"


def _length_class(text_len: float | None) -> str:
    if text_len is None:
        return "unknown"
    return next((name for bound, name in LENGTH_CLASSES if text_len <= bound), "longer")


class InvalidField(ValueError):
    """A field an event needs holds a value the pipeline cannot use."""


def _number(fields: dict[str, Any], name: str) -> float | None:
    value: Any = fields.get(name)
    if value is None:  # most of the optional numbers, most of the time
        return None
    kind = type(value)
    number: float
    if kind is float or kind is int:
        number = value
    elif kind is str:
        try:
            number = float(value)  # text format: "523"
        except ValueError:
            try:
                number = float(value.split()[0])  # "86 chars"
            except (ValueError, IndexError):
                raise InvalidField(name) from None
    else:  # bool, list, object
        raise InvalidField(name)
    # Also false for NaN: counters and sums only ever grow by finite, non-negative amounts.
    if not 0 <= number <= MAX_NUMBER:
        raise InvalidField(name)
    return number


def _raw_label(value: Any, name: str, missing: str) -> Any:
    """A label's raw value, checked to be one a label can be made of (not a list or object);
    ``missing`` for None (absent, or JSON null)."""
    if value is None:
        return missing
    if type(value) not in _LABEL_TYPES:
        raise InvalidField(name)
    return value


def _label(cap: LabelCap, raw: object) -> str:
    """The label value of a raw value that passed :func:`_raw_label`."""
    value = cap.known.get(raw)
    if value is None:
        text = str(raw)
        if text[:1] in ('"', "'"):
            text = str(convert_value(text))
        value = cap.admit(raw, text)
    return value


def _extract(fields: dict[str, Any], spec: tuple[tuple[str, int], ...]) -> list[Any]:
    """The values ``spec`` names (see :data:`NUMBER`), as the classifier extracts them."""
    return [_number(fields, name) if kind == NUMBER else _flag(fields, name) if kind == FLAG
            else fields.get(name) for name, kind in spec]


def _text_length(text: Any) -> int | None:
    """The length, in characters, of a ``text`` field's value (the text is never kept): a JSON
    string as it is, a text-format value without its quotes and escapes."""
    if text is None:
        return None
    if type(text) is not str:
        raise InvalidField("text")
    if text[:1] in ('"', "'"):
        text = str(convert_value(text))
    return len(text)


def _flag(fields: dict[str, Any], name: str) -> bool:
    try:
        return fields.get(name) in _TRUE
    except TypeError:  # a list or object is not a flag
        return False


class LogPipeline:
    """Maps parsed records onto :class:`SidecarMetrics`; one instance per sidecar."""

    def __init__(
        self,
        metrics: SidecarMetrics,
        logs: LogsConfig,
        metrics_config: MetricsConfig,
        on_records: RecordCallback | None = None,
        count_restarts: bool = True,
        native: bool = True,
    ) -> None:
        self.metrics = metrics
        self.parser = RecordParser(logs.aliases)
        self.on_records = on_records
        self.count_restarts = count_restarts
        metrics.limit_log_labels(SeriesLimits(
            max_series=metrics_config.max_series_per_family,
            values_per_label=metrics_config.label_value_cap,
            value_max_bytes=metrics_config.label_value_max_bytes))
        m = metrics
        self._method, self._route, self._code, self._error = m.http_requests.caps
        (self._duration_route,) = m.http_duration.caps
        self._status, self._error_code, self._model_version = m.syntheses.caps
        (self._cache_path,) = m.cache_usage.caps
        (self._stage,) = m.stage_duration.caps
        self._record_code = m.log_records.caps[1]
        self._handlers: dict[str, Callable[[dict[str, Any], Any], None]] = {
            "http_request": self._http_request,
            "synthesis_complete": self._synthesis_complete,
            "synthesis_start": self._synthesis_start,
            "stage_time": self._stage_time,
            "first_audio": self._first_audio,
            "audio_metrics": self._audio_metrics,
            "service_start": self._service_start,
            "cache_health": self._cache_usage,
            "cache_dir_usage": self._cache_usage,
        }
        # Events whose values the classifier extracts itself, with what counts them
        self._specs: dict[str, tuple[tuple[str, int], ...]] = {
            "synthesis_complete": SYNTHESIS_SPEC}
        self._counters: dict[str, Callable[..., None]] = {
            "synthesis_complete": self._count_synthesis}
        tables = self.parser.name_tables(READ_FIELDS, self._handlers)
        self._classifier = (
            Classifier(*tables, NUMBER_FIELDS, LABEL_FIELDS, LEVEL_ALIASES, self._specs,
                       _TRUE, MAX_NUMBER)
            if native and Classifier is not None and tables is not None else None)

    def process(self, source: str, data: bytes) -> None:
        """Count every complete line in ``data`` (caller holds the metrics lock)."""
        items: list[str | ClassifiedLine]
        if self._classifier is not None:
            items, continuation = self._classifier.classify(data)
        else:
            text = data.decode("utf-8", "replace")
            if "\r" in text:
                text = text.replace("\r\n", "\n")
            items = text.split("\n")  # type: ignore[assignment]
            if items and items[-1] == "":
                items.pop()
            continuation = 0
        parsed_lines = malformed = 0
        other: dict[str, int] = {}
        fields_of = self.parser.fields
        json_fields = self.parser.json_fields  # most lines: skip fields()' dispatch
        handlers = self._handlers
        counters = self._counters
        on_records = self.on_records
        keep: list[KeptLine] = []
        for item in items:
            if isinstance(item, str):  # a line for the parser
                line = item
                try:
                    parsed = json_fields(line) if line[:1] == "{" else fields_of(line)
                except MalformedLine:
                    malformed += 1
                    continue
                if parsed is None:
                    continuation += 1
                    continue
                level, event, fields = parsed
                values = None
            else:  # what the classifier read: the same values as the parser's
                level, event, fields, line, values = item
            request_id = fields.get("id")
            if request_id and on_records is not None:
                keep.append((request_id, event, line, fields.get("status")))
            handler = handlers.get(event)
            try:
                # Checked before the handler changes anything, counted after it succeeded.
                code = self._level_code(fields) if level in _COUNTED_LEVELS else None
                if values is not None:  # the event's spec, extracted by the classifier
                    counters[event](request_id, *values)
                elif handler is not None:
                    handler(fields, request_id)
                if code is not None:
                    self.metrics.log_records.inc((level, _label(self._record_code, code)))
            except InvalidField:
                other["invalid_field"] = other.get("invalid_field", 0) + 1
                continue
            except Exception:  # a bug must cost one line, not the batch or the tailer
                if "error" not in other:
                    log.exception("log line from %s could not be counted", source)
                other["error"] = other.get("error", 0) + 1
                continue
            if handler is not None:
                parsed_lines += 1
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

    @staticmethod
    def _level_code(fields: dict[str, Any]) -> object:
        if fields.get("warning_code"):
            return _raw_label(fields["warning_code"], "warning_code", "none")
        return _raw_label(fields.get("error_code") or None, "error_code", "none")

    # --- event handlers: every check (which may raise InvalidField) before any update --------

    def _http_request(self, fields: dict[str, Any], request_id: object) -> None:
        duration = _number(fields, "duration_ms")
        method = _raw_label(fields.get("method"), "method", "")
        route = _raw_label(fields.get("route") or fields.get("endpoint") or None, "route",
                           "unknown")
        status = _raw_label(fields.get("status"), "status", "")
        error = error_label(fields.get("error_code"), status)
        m = self.metrics
        m.http_requests.inc((_label(self._method, method), _label(self._route, route),
                             _label(self._code, status), _label(self._error, error)))
        if duration is not None:
            m.http_duration.observe((_label(self._duration_route, route),), duration / 1000.0,
                                    request_id)

    def _synthesis_complete(self, fields: dict[str, Any], request_id: object) -> None:
        self._count_synthesis(request_id, *_extract(fields, SYNTHESIS_SPEC))

    def _count_synthesis(self, request_id: object, duration: float | None,
                         text_len: float | None, audio_ms: float | None,
                         queue_ms: float | None, batch_size: float | None,
                         audio_kb: float | None, rms: float | None,
                         centroid: float | None, text: Any, status: Any, error_code: Any,
                         model_version: Any, cache_hit: bool, cache_saved: bool,
                         fallback_used: bool) -> None:
        """A ``synthesis_complete`` from the values of :data:`SYNTHESIS_SPEC`."""
        if text_len is None:
            text_len = _text_length(text)
        status = _raw_label(status, "status", "unknown")
        success = status == "success"
        error_code = "none" if success else _raw_label(error_code or None, "error_code",
                                                       "unknown")
        model_version = _raw_label(model_version or None, "model_version", "unknown")
        m = self.metrics
        m.syntheses.inc((_label(self._status, status), _label(self._error_code, error_code),
                         _label(self._model_version, model_version)))
        m.cache_lookups.inc(())
        if cache_hit:
            m.cache_hits.inc(())
        if cache_saved:
            m.cache_saves.inc(())
        if fallback_used:
            m.synthesis_fallbacks.inc(())
        if audio_kb is not None:
            m.audio_bytes.inc((), audio_kb * 1024)
        if duration is not None:
            m.synthesis_duration.observe((_length_class(text_len),), duration / 1000.0,
                                         request_id)
        if text_len is not None:
            m.text_length.observe((), text_len, request_id)
        if queue_ms is not None:
            m.queue_wait.observe((), queue_ms / 1000.0, request_id)
        if batch_size is not None and not cache_hit:
            m.batch_size.observe((), batch_size, request_id)
        if success and not cache_hit and duration is not None and audio_ms is not None:
            m.synthesis_seconds.inc((), duration / 1000.0)
            m.audio_seconds.inc((), audio_ms / 1000.0)
        self._observe_audio(rms, centroid, request_id)

    def _synthesis_start(self, fields: dict[str, Any], request_id: object) -> None:
        # A start that carries the text itself and no text_len (IndexTTS) is where its length
        # is known; its synthesis_complete carries neither. A start with text_len adds nothing:
        # the complete line counts that.
        if "text_len" not in fields:
            text_len = _text_length(fields.get("text"))
            if text_len is not None:
                self.metrics.text_length.observe((), text_len, request_id)

    def _cache_usage(self, fields: dict[str, Any], request_id: object) -> None:
        used = _number(fields, "used_percent")
        if used is not None:
            path = _raw_label(fields.get("path") or None, "path", "unknown")
            self.metrics.cache_usage.set_limited((_label(self._cache_path, path),),
                                                 used / 100.0)

    def _stage_time(self, fields: dict[str, Any], request_id: object) -> None:
        # The most frequent event (one per stage per synthesis).
        duration = _number(fields, "duration_ms")
        if duration is not None:
            stage = fields.get("stage") or "unknown"
            if type(stage) not in _LABEL_TYPES:
                raise InvalidField("stage")
            cap = self._stage
            self.metrics.stage_duration.observe((cap.known.get(stage) or _label(cap, stage),),
                                                duration / 1000.0, request_id)

    def _first_audio(self, fields: dict[str, Any], request_id: object) -> None:
        duration = _number(fields, "duration_ms")
        if duration is not None:
            self.metrics.time_to_first_audio.observe((), duration / 1000.0, request_id)

    def _audio_metrics(self, fields: dict[str, Any], request_id: object) -> None:
        self._observe_audio(_number(fields, "rms"), _number(fields, "spectral_centroid"),
                            request_id)

    def _observe_audio(self, rms: float | None, centroid: float | None,
                       request_id: object) -> None:
        if rms is not None:
            self.metrics.audio_rms.observe((), rms, request_id)
        if centroid is not None:
            self.metrics.audio_centroid.observe((), centroid, request_id)

    def _service_start(self, fields: dict[str, Any], request_id: object) -> None:
        if self.count_restarts:
            self.metrics.app_restarts.inc(())
