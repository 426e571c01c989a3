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
Continuation lines (tracebacks) change no metric, so no per-source state is needed.

IndexTTS text lines are recognised by compiled code (``Classifier`` in
exporter/analyze/_scan.c, the recogniser analyze's scanner uses). It hands a record whose
shape fixes its meaning to the handlers as (level, event, fields) — only the fields in
:data:`READ_FIELDS`, numbers already converted where ``float()`` gives the same — and reads
consecutive ``synthesis_complete`` lines whole into a run: per line, its *kind* (the raw
labels and flags, which numbers it carries, its length class: :data:`SynthesisKind`) and its
numbers. What a kind does to the metrics is decided once per batch by :meth:`LogPipeline._plan`
(the same decision the Python path takes for every such line, labels admitted and series
made in the same order) and carried out by the run line by line in compiled code, adding
each amount in log order so every sum is the one line-by-line counting gives. Every other line
goes through :class:`RecordParser`, as all lines do where the extension is not built
(tests/unit/test_pipeline_native.py checks that both give identical metrics).
``on_records`` receives, once per chunk, the record lines that carry a request id (not their
tracebacks) with their id, event and status; ``RecordParser`` parses them again when needed.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from exporter.config import LogsConfig, MetricsConfig
from exporter.logs.parsers import LEVEL_ALIASES, MalformedLine, RecordParser, convert_value
from exporter.metrics import MAX_EXEMPLAR_ID_CHARS, LabelCap, SeriesLimits, SidecarMetrics

if TYPE_CHECKING:
    from exporter.analyze._scan import ClassifiedLine, SynthesisRun

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

SYNTHESIS_NUMBERS = ("duration_ms", "text_len", "audio_duration_ms", "queue_ms",
                     "batch_size", "audio_size_kb", "rms", "spectral_centroid")
SYNTHESIS_LABELS = ("status", "error_code", "model_version")
SYNTHESIS_FLAGS = ("cache_hit", "cache_saved", "fallback_used")
_DURATION, _TEXT_LEN, _AUDIO_MS, _QUEUE, _BATCH, _AUDIO_KB, _RMS, _CENTROID = range(8)
_BITS = tuple(1 << i for i in range(len(SYNTHESIS_NUMBERS)))
_KEY_TYPES = (str, type(None))
"""Types of raw label values whose kinds are decided once per batch (others: per line)."""

NUMBER, LABEL, FLAG, TEXT = 1, 2, 3, 4
"""What a spec entry is to the classifier: a number it converts (:func:`_number`), a label
whose raw value is part of the line's kind, a flag (:func:`_flag`) that is too, and the text
whose length stands in for a missing ``text_len`` (such a line is left to the handler)."""
SYNTHESIS_SPEC = (*((name, NUMBER) for name in SYNTHESIS_NUMBERS),
                  *((name, LABEL) for name in SYNTHESIS_LABELS),
                  *((name, FLAG) for name in SYNTHESIS_FLAGS), ("text", TEXT))
"""What ``synthesis_complete`` reads, in the order of :data:`SynthesisKind`'s parts and of
its numbers."""

SynthesisKind = tuple[object, object, object, bool, bool, bool, int, int]
"""What a ``synthesis_complete`` does to the metrics, but for its numbers' values: its raw
status, error code and model version, its three flags, which numbers it carries (bit i for
:data:`SYNTHESIS_NUMBERS` [i]) and its text length class (index in :data:`LENGTH_CLASSES`,
its length past them all, -1 without a length)."""

ADD, OBSERVE = False, True
AS_IS, MILLISECONDS, KIB = 0, 1, 2
"""How an op's amount is made from its number: as it is, ms → s, KiB → bytes."""
Op = tuple[bool, Any, tuple[str, ...], int, int]
"""(OBSERVE or ADD, family, series key, number index or -1 for 1, AS_IS|MILLISECONDS|KIB): one
update a kind of line makes, to apply per line with that line's numbers."""

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
_LENGTH_BOUNDS = tuple(float(bound) for bound, _ in LENGTH_CLASSES)
_LENGTH_NAMES = (*(name for _, name in LENGTH_CLASSES), "longer", "unknown")
"""By length class index (-1: the last)."""


def error_label(code: object, status: object) -> str:
    """The ``error`` label of an http_request line: its app error code, ``none`` for a line
    without one that did not fail, ``other`` for anything else (never a new value)."""
    if code is None or code == "":
        failed = str(status)[:1] in ("4", "5")
        return "other" if failed else "none"
    return code if isinstance(code, str) and code in APP_ERROR_CODES else "other"


def _length_class(text_len: float | None) -> int:
    # bisect_left: the first bound the length does not exceed (past them all: their count)
    return -1 if text_len is None else bisect_left(_LENGTH_BOUNDS, text_len)


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
        self._plans: dict[SynthesisKind, list[Op]] = {}
        # The batch's runs: each kind's steps, and the series (targets) they update.
        self._kind_steps: dict[SynthesisKind, tuple[tuple[int, int, int], ...] | None] = {}
        self._targets: list[tuple[bool, Any, tuple[str, ...]]] = []
        self._target_index: dict[tuple[int, tuple[str, ...]], int] = {}
        tables = self.parser.name_tables(READ_FIELDS, self._handlers)
        self._classifier = (
            Classifier(*tables, NUMBER_FIELDS, LABEL_FIELDS, LEVEL_ALIASES,
                       {"synthesis_complete": (SYNTHESIS_SPEC, _TEXT_LEN, _LENGTH_BOUNDS)}, _TRUE,
                       MAX_NUMBER, _COUNTED_LEVELS, MAX_EXEMPLAR_ID_CHARS)
            if native and Classifier is not None and tables is not None else None)

    def process(self, source: str, data: bytes) -> None:
        """Count every complete line in ``data`` (caller holds the metrics lock)."""
        items: list[str | ClassifiedLine | SynthesisRun]
        on_records = self.on_records
        if self._classifier is not None:
            items, continuation = self._classifier.classify(data, on_records is not None)
        else:
            text = data.decode("utf-8", "replace")
            if "\r" in text:
                text = text.replace("\r\n", "\n")
            items = text.split("\n")  # type: ignore[assignment]
            if items and items[-1] == "":
                items.pop()
            continuation = 0
        # What a kind of synthesis does is decided once per batch (label caps and series
        # budgets only ever fill up, so the decision stays right until the batch ends).
        self._plans.clear()
        self._kind_steps.clear()
        self._targets.clear()
        self._target_index.clear()
        parsed_lines = malformed = 0
        other: dict[str, int] = {}
        fields_of = self.parser.fields
        json_fields = self.parser.json_fields  # most lines: skip fields()' dispatch
        handlers = self._handlers
        keep: list[KeptLine] = []
        for item in items:
            if type(item) is str:  # a line for the parser
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
            elif type(item) is tuple:  # what the classifier read: the parser's values
                level, event, fields, line = item
            else:  # consecutive syntheses the classifier read whole
                run = cast("SynthesisRun", item)
                try:
                    counted, failed = self._count_run(source, run)
                except Exception:  # a bug costs the run's lines, not the batch
                    log.exception("syntheses from %s could not be counted", source)
                    counted, failed = 0, len(run)
                parsed_lines += counted
                if failed:
                    other["error"] = other.get("error", 0) + failed
                if on_records is not None:
                    keep.extend(run.kept)
                continue
            request_id = fields.get("id")
            if request_id and on_records is not None:
                keep.append((request_id, event, line, fields.get("status")))
            handler = handlers.get(event)
            try:
                # Checked before the handler changes anything, counted after it succeeded.
                code = self._level_code(fields) if level in _COUNTED_LEVELS else None
                if handler is not None:
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

    def _count_run(self, source: str, run: SynthesisRun) -> tuple[int, int]:
        """Apply a run's plans with its numbers (in compiled code, in line order, so every
        sum is added up exactly as line by line); (lines counted, lines that failed)."""
        plans = [self._steps(kind, source) for kind in run.kinds]
        targets = self._targets
        sums = [family.series[key].sum if observes else family.values[key]
                for observes, family, key in targets]
        bounds = [family.bounds if observes else None for observes, family, _ in targets]
        sums, counts, exemplars, failed = run.apply(plans, sums, bounds)
        now = time.time()
        for target, (observes, family, key) in enumerate(targets):
            if observes:
                series = family.series[key]
                series.sum = sums[target]
                for bucket, count in counts[target]:
                    series.counts[bucket] += count
                for bucket, request_id, value in exemplars[target]:
                    series.exemplars[bucket] = (request_id, value, now)
            else:
                family.values[key] = sums[target]
        return len(run) - failed, failed

    def _steps(self, kind: SynthesisKind, source: str) -> tuple[tuple[int, int, int], ...] | None:
        """A kind's plan as the run applies it: (target, number, scale) steps, targets
        numbered for the whole batch; None where it cannot be decided (its lines fail)."""
        if kind in self._kind_steps:
            return self._kind_steps[kind]
        try:
            ops = self._plan(kind)
        except Exception:  # a bug costs this kind's lines, not the run
            log.exception("syntheses from %s could not be counted", source)
            ops = None
        steps: tuple[tuple[int, int, int], ...] | None = None
        if ops is not None:
            index = self._target_index
            found = []
            for observes, family, key, number, scale in ops:
                target = index.get((id(family), key))
                if target is None:
                    target = index[(id(family), key)] = len(self._targets)
                    self._targets.append((observes, family, key))
                found.append((target, number, scale))
            steps = tuple(found)
        self._kind_steps[kind] = steps
        return steps

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
        numbers = [_number(fields, name) for name in SYNTHESIS_NUMBERS]
        if numbers[_TEXT_LEN] is None:
            numbers[_TEXT_LEN] = _text_length(fields.get("text"))
        present = 0
        for bit, number in zip(_BITS, numbers, strict=True):
            if number is not None:
                present |= bit
        get = fields.get
        kind: SynthesisKind = (
            get("status"), get("error_code"), get("model_version"), _flag(fields, "cache_hit"),
            _flag(fields, "cache_saved"), _flag(fields, "fallback_used"), present,
            _length_class(numbers[_TEXT_LEN]))
        ops = self._plan(kind)
        for observes, family, key, number, scale in ops:
            value: Any = 1.0 if number < 0 else numbers[number]
            if scale == MILLISECONDS:
                value = value / 1000.0
            elif scale == KIB:
                value = value * 1024
            if observes:
                family.observe(key, value, request_id)
            else:
                family.inc(key, value)

    def _plan(self, kind: SynthesisKind) -> list[Op]:
        """The updates a synthesis of this kind makes (:data:`Op`), after checking its labels
        (InvalidField), admitting them and making its series exist, in the order line by line
        counting would; kinds whose label values are all text or absent are decided once per
        batch."""
        cached = (type(kind[0]) in _KEY_TYPES and type(kind[1]) in _KEY_TYPES
                  and type(kind[2]) in _KEY_TYPES)
        ops = self._plans.get(kind) if cached else None
        if ops is None:
            ops = self._decide(kind)
            if cached:
                self._plans[kind] = ops
        return ops

    def _decide(self, kind: SynthesisKind) -> list[Op]:
        status, error_code, model_version, cache_hit, cache_saved, fallback_used, present, \
            length = kind
        status = _raw_label(status, "status", "unknown")
        success = status == "success"
        error_code = "none" if success else _raw_label(error_code or None, "error_code",
                                                       "unknown")
        model_version = _raw_label(model_version or None, "model_version", "unknown")
        m = self.metrics
        ops: list[Op] = []

        def add(family: Any, labels: tuple[str, ...] = (), number: int = -1,
                scale: int = AS_IS) -> None:
            ops.append((ADD, family, family.slot(labels), number, scale))

        def observe(family: Any, number: int, scale: int = AS_IS,
                    labels: tuple[str, ...] = ()) -> None:
            if present & (1 << number):
                ops.append((OBSERVE, family, family.slot(labels), number, scale))

        with m.recording_overflows() as overflows:
            add(m.syntheses, (_label(self._status, status), _label(self._error_code, error_code),
                              _label(self._model_version, model_version)))
            add(m.cache_lookups)
            if cache_hit:
                add(m.cache_hits)
            if cache_saved:
                add(m.cache_saves)
            if fallback_used:
                add(m.synthesis_fallbacks)
            if present & (1 << _AUDIO_KB):
                add(m.audio_bytes, (), _AUDIO_KB, KIB)
            observe(m.synthesis_duration, _DURATION, MILLISECONDS, (_LENGTH_NAMES[length],))
            observe(m.text_length, _TEXT_LEN)
            observe(m.queue_wait, _QUEUE, MILLISECONDS)
            if not cache_hit:
                observe(m.batch_size, _BATCH)
            both = (1 << _DURATION) | (1 << _AUDIO_MS)
            if success and not cache_hit and present & both == both:
                add(m.synthesis_seconds, (), _DURATION, MILLISECONDS)
                add(m.audio_seconds, (), _AUDIO_MS, MILLISECONDS)
            observe(m.audio_rms, _RMS)
            observe(m.audio_centroid, _CENTROID)
        for overflow in overflows:  # counted per line, as line by line counting counts them
            add(m.label_overflow, overflow)
        return ops

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
