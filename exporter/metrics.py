"""Every metric the sidecar exports, defined in one place, on primitives cheap enough for the
log pipeline's per-line loop.

Why not prometheus_client's ``Counter``/``Histogram`` directly: each of their calls takes a lock
and walks label validation, on the per-line path as much work again as the parsing
(docs/benchmarks.md, "Comment figures"). Here a family is a plain dict from a label-value tuple
to a value (or to a bucket array for histograms). Writers hold :meth:`MetricSet.updating`
once per *batch* of lines (single updates go through :meth:`SidecarMetrics.count`, which takes
it), the scrape holds it once while it snapshots, and :class:`MetricSet` is a prometheus_client
collector, so exposition (text and OpenMetrics, exemplars included) stays the library's.

Families fed with label values from logs carry :class:`SeriesLimits` (set by the log pipeline
from ``metrics.*`` config): each label of each such family admits at most ``values_per_label``
distinct values, each cut to ``value_max_bytes`` UTF-8 bytes, and the family at most
``max_series`` series; past either bound an observation goes to ``other`` (one label, or the
whole series) and counts in ``tts_exporter_label_overflow_total{family,label}``. With every
label-bearing log family bounded, :meth:`SidecarMetrics.log_derived_bound_bytes` gives the most
bytes log content can add to ``/metrics``, whatever it holds.
"""

from __future__ import annotations

import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import msgspec
from msgspec import Meta
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from exporter.config import DEFAULT_DURATION_BUCKETS_S, DEFAULT_TEXT_LENGTH_BUCKETS
from exporter.schema import Amount, Finite, ForeignSchema, InvalidInput, rules, validate

_Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]


def _histogram_state(name: str, bounds: list[float], labels: Any) -> Any:
    """The checkpoint's shape of one histogram: series of today's bounds hold one count per
    bucket; other bounds are dropped whole (a config change), so their counts are not checked."""
    def buckets_fit(state: Any) -> None:
        if state.bounds == bounds:
            rules(series=next((f"expected {len(bounds) + 1} bucket counts in each series, got "
                               f"{len(s[1])}" for s in state.series
                               if len(s[1]) != len(bounds) + 1), None))
    return msgspec.defstruct(name, [("bounds", list[Finite]),
                                    ("series", list[tuple[labels, list[_Count], Amount]])],
                             bases=(ForeignSchema,), frozen=True,
                             namespace={"__post_init__": buckets_fit})


OVERFLOW_LABEL_VALUE = "other"
SERIES_OVERFLOW_LABEL = "*"
"""``label`` of ``tts_exporter_label_overflow_total`` when a family's series budget, not one
label's cap, folded an observation into the all-``other`` series."""
MAX_EXEMPLAR_ID_CHARS = 64
"""Longer request ids get no exemplar: OpenMetrics allows 128 characters for an exemplar's
labels, and the bound keeps exemplars small in the size budget's worst case."""

Labels = tuple[str, ...]
Overflow = Callable[[str, str], None]
"""``overflow(family, label)``: called once per observation folded into ``other``."""


@dataclass(frozen=True)
class SeriesLimits:
    """The bounds on one family whose label values come from logs."""

    max_series: int
    values_per_label: int
    value_max_bytes: int


def cut_to_bytes(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, never inside a character."""
    if len(text) * 4 <= max_bytes:   # no character takes more than 4 bytes
        return text
    return text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore")


class LabelCap:
    """The values one label of one family may take: the first ``cap`` distinct ones (each cut to
    ``max_bytes``), then ``other``.

    ``known`` maps raw values (as they came from a log line) to their label value: the hot
    path's one dict lookup. It is bounded too, since many raw values may share one cut value.
    """

    __slots__ = ("_on_overflow", "cap", "known", "max_bytes", "values")

    def __init__(self, cap: int, max_bytes: int, on_overflow: Callable[[], None]) -> None:
        self.cap = cap
        self.max_bytes = max_bytes
        self.values: set[str] = set()
        self.known: dict[object, str] = {}
        self._on_overflow = on_overflow

    def admit(self, raw: object, text: str, count: bool = True) -> str:
        """The label value for ``raw``, whose text is ``text``; ``count=False`` when restoring
        series that were already counted."""
        text = cut_to_bytes(text, self.max_bytes)
        values = self.values
        if text in values or len(values) < self.cap:
            values.add(text)
            if len(self.known) < 4 * self.cap:
                self.known[raw] = text
            return text
        if count and text != OVERFLOW_LABEL_VALUE:
            self._on_overflow()
        return OVERFLOW_LABEL_VALUE


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.caps: tuple[LabelCap, ...] = ()
        self.max_series: int | None = None
        self._overflow_key = (OVERFLOW_LABEL_VALUE,) * len(self.labelnames)
        self._on_overflow: Overflow | None = None

    @property
    def exposed_name(self) -> str:
        return self.name

    def limit(self, limits: SeriesLimits, on_overflow: Overflow) -> None:
        """Bound this family's series and label values (see :class:`SeriesLimits`)."""
        name = self.exposed_name
        self.max_series = limits.max_series
        self._on_overflow = on_overflow
        self.caps = tuple(
            LabelCap(limits.values_per_label, limits.value_max_bytes,
                     partial(on_overflow, name, label))
            for label in self.labelnames)

    def most_series(self) -> int:
        """The most series this family can hold (unbounded: -1)."""
        if self.max_series is None:
            return -1
        combinations = 1
        for cap in self.caps:
            combinations *= cap.cap + 1
        return min(self.max_series + 1, combinations)

    def _series_key(self, labels: Labels, size: int, count: bool = True) -> Labels:
        """``labels`` for a series not yet present, or the all-``other`` series once the family
        holds ``max_series`` series."""
        if self.max_series is None or size < self.max_series or labels == self._overflow_key:
            return labels
        if count and self._on_overflow is not None:
            self._on_overflow(self.exposed_name, SERIES_OVERFLOW_LABEL)
        return self._overflow_key

    def restored_key(self, labels: Sequence[str], size: int) -> Labels:
        """A checkpointed series' labels passed through today's bounds (which may be tighter
        than the ones it was written under), without counting overflows again."""
        if not self.caps:
            return tuple(labels)
        key = tuple(cap.admit(value, value, count=False) for cap, value in zip(
            self.caps, labels, strict=True))
        return self._series_key(key, size, count=False)

    def _collect(self) -> Metric:
        raise NotImplementedError


class CounterFamily(_Family):
    """A counter with labels; ``inc`` with the label *values* tuple, in ``labelnames`` order."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if name.endswith("_total"):
            name = name[: -len("_total")]
        super().__init__(name, documentation, labelnames)
        self.values: dict[Labels, float] = {}

    @property
    def exposed_name(self) -> str:
        return self.name + "_total"

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        values = self.values
        current = values.get(labels)
        if current is None:
            labels = self._series_key(labels, len(values))
            current = values.get(labels, 0.0)
        values[labels] = current + amount

    def get(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0.0)

    def slot(self, labels: Labels = ()) -> Labels:
        """The key :meth:`inc` of ``labels`` adds to, its series made to exist (at 0) as
        :meth:`inc` would make it, overflows counted as it would count them."""
        values = self.values
        if labels in values:
            return labels
        labels = self._series_key(labels, len(values))
        values.setdefault(labels, 0.0)
        return labels

    def _collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class GaugeFamily(_Family):
    """A gauge with labels; ``set``/``remove``/``clear`` so vanished things (a lost GPU, an old
    log file) stop being exported instead of showing a stale value as fresh."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self.values: dict[Labels, float] = {}

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value

    def set_limited(self, labels: Labels, value: float) -> None:
        """:meth:`set` within the family's series budget (labels from logs)."""
        values = self.values
        if labels not in values:
            labels = self._series_key(labels, len(values))
        values[labels] = value

    def get(self, labels: Labels = ()) -> float | None:
        return self.values.get(labels)

    def remove(self, labels: Labels) -> None:
        self.values.pop(labels, None)

    def clear(self) -> None:
        self.values.clear()

    def _collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class _HistogramSeries:
    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self, n_buckets: int) -> None:
        # counts[i] is the number of observations in (bound[i-1], bound[i]]; the last slot is +Inf.
        self.counts = [0] * (n_buckets + 1)
        self.sum = 0.0
        self.exemplars: list[tuple[str, float, float] | None] = [None] * (n_buckets + 1)


class HistogramFamily(_Family):
    """A histogram keeping per-bucket (not cumulative) counts; cumulated only at scrape time.

    ``observe`` optionally records the request id as the bucket's exemplar, so a dashboard's
    slow bucket links to a concrete request (resolvable at the sidecar's ``/requests/{id}``).
    """

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS_S,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = sorted(float(b) for b in buckets)
        self.series: dict[Labels, _HistogramSeries] = {}

    def observe(self, labels: Labels, value: float, exemplar_id: object = None) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self._new_series(labels)
        index = bisect_left(self.bounds, value)
        series.counts[index] += 1
        series.sum += value
        if type(exemplar_id) is str and 0 < len(exemplar_id) <= MAX_EXEMPLAR_ID_CHARS:
            series.exemplars[index] = (exemplar_id, value, time.time())

    def slot(self, labels: Labels = ()) -> Labels:
        """The key of the series :meth:`observe` of ``labels`` adds to, made to exist as it
        would make it."""
        series = self.series
        if labels in series:
            return labels
        labels = self._series_key(labels, len(series))
        if labels not in series:
            series[labels] = _HistogramSeries(len(self.bounds))
        return labels

    def _new_series(self, labels: Labels) -> _HistogramSeries:
        return self.series[self.slot(labels)]

    def count(self, labels: Labels = ()) -> int:
        series = self.series.get(labels)
        return sum(series.counts) if series else 0

    def total(self, labels: Labels = ()) -> float:
        series = self.series.get(labels)
        return series.sum if series else 0.0

    def _collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bound_names = [_format_bound(b) for b in self.bounds] + ["+Inf"]
        for labels, series in self.series.items():
            cumulative = 0
            buckets: list[Any] = []
            for bound, count, exemplar in zip(
                bound_names, series.counts, series.exemplars, strict=True
            ):
                cumulative += count
                if exemplar is None:
                    buckets.append((bound, cumulative))
                else:
                    request_id, value, ts = exemplar
                    buckets.append((bound, cumulative, Exemplar({"request_id": str(request_id)},
                                                                value, ts)))
            family.add_metric(list(labels), buckets, series.sum)
        return family


def _finite_sum(a: float, b: float) -> float:
    """``a + b`` of two restored values; series folded together by tighter bounds must not
    add up to infinity."""
    return min(a + float(b), sys.float_info.max)


def _format_bound(bound: float) -> str:
    return repr(float(bound))


class MetricSet(Collector):
    """All families of one sidecar, registered as one prometheus_client collector.

    Writers hold :meth:`updating` around a batch of updates; :meth:`collect` holds it while it
    builds the exposition families, so a scrape never sees half a batch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def _add(self, family: Any) -> Any:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} defined twice")
        self._families[family.name] = family
        return family

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) \
            -> CounterFamily:
        return self._add(CounterFamily(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> GaugeFamily:
        return self._add(GaugeFamily(name, documentation, labelnames))

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS_S) -> HistogramFamily:
        return self._add(HistogramFamily(name, documentation, labelnames, buckets))

    def updating(self) -> threading.Lock:
        """``with metric_set.updating():`` around every read-modify-write of the families (and
        of state that must change together with them, like the tailer's offsets). The lock
        itself, not a wrapper: the log pipeline takes it once per batch of lines."""
        return self._lock

    def families(self) -> Iterable[_Family]:
        return self._families.values()

    def dump_state(self, names: Iterable[str]) -> dict[str, Any]:
        """JSON-ready values of the named counters and histograms, for the checkpoint.

        Persisting them with the log offsets (one atomic write) is what makes totals exact
        across a restart: lines after the checkpoint are re-read and counted on top of the
        checkpointed totals, lines before it are never seen again.
        """
        state: dict[str, Any] = {}
        for name in names:
            family = self._families[name]
            if isinstance(family, CounterFamily):
                state[name] = [[list(k), v] for k, v in family.values.items()]
            elif isinstance(family, HistogramFamily):
                state[name] = {"bounds": family.bounds, "series": [
                    [list(k), s.counts, s.sum] for k, s in family.series.items()]}
        return state

    def check_state(self, state: object) -> None:
        """Raise ValueError, naming the JSON path, unless ``state`` is something
        :meth:`load_state` restores completely: every sample of a known family shaped as
        :meth:`dump_state` writes it, with its labels, finite non-negative values, and (for a
        histogram whose bounds are today's) one count per bucket."""
        try:
            validate(self._state_model(), state)
        except InvalidInput as exc:
            raise ValueError("; ".join(f"metrics.{key}: {text}" if key else f"metrics: {text}"
                                       for key, text in exc.problems)[:2000]) from None

    def _state_model(self) -> type[msgspec.Struct]:
        """The schema of :meth:`dump_state`'s output for today's families (others are
        ignored: :meth:`load_state` drops them)."""
        fields: list[tuple[str, Any, Any]] = []
        for family in self._families.values():
            n = len(family.labelnames)
            labels = Annotated[list[str], Meta(min_length=n, max_length=n)]
            if isinstance(family, CounterFamily):
                fields.append((family.name, list[tuple[labels, Amount]] | None, None))
            elif isinstance(family, HistogramFamily):
                state = _histogram_state(family.name, family.bounds, labels)
                fields.append((family.name, state | None, None))
        return msgspec.defstruct("MetricsState", fields, bases=(ForeignSchema,), frozen=True)

    def load_state(self, state: dict[str, Any]) -> list[str]:
        """Restore what :meth:`dump_state` wrote and :meth:`check_state` accepted; returns
        names it had to drop (unknown metric or changed histogram buckets), which the caller
        logs. Series pass through today's bounds: past them they fold into ``other``."""
        dropped = []
        for name, value in state.items():
            family = self._families.get(name)
            if isinstance(family, CounterFamily):
                # Series exported from start-up (at 0) stay exported, whatever was saved.
                family.values = dict.fromkeys(family.values, 0.0)
                for labels, amount in value:
                    key = family.restored_key(labels, len(family.values))
                    family.values[key] = _finite_sum(family.values.get(key, 0.0), amount)
            elif isinstance(family, HistogramFamily) and value["bounds"] == family.bounds:
                family.series = {}
                for labels, counts, total in value["series"]:
                    key = family.restored_key(labels, len(family.series))
                    series = family.series.get(key)
                    if series is None:
                        series = family.series[key] = _HistogramSeries(len(family.bounds))
                    series.counts = [a + int(b) for a, b in zip(series.counts, counts,
                                                                strict=True)]
                    series.sum = _finite_sum(series.sum, total)
            else:
                dropped.append(name)
        return dropped

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = [family._collect() for family in self._families.values()]
        yield from snapshot


# Bucket layouts for business histograms whose unit is not seconds.
TEXT_LENGTH_BUCKETS = [float(b) for b in DEFAULT_TEXT_LENGTH_BUCKETS]
RMS_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
SPECTRAL_CENTROID_BUCKETS_HZ = [250.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0,
                                6000.0, 8000.0]
FIRST_AUDIO_BUCKETS_S = [0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.5, 5.0]
BATCH_SIZE_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
STAGE_BUCKETS_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class SidecarMetrics:
    """The sidecar's metric families, grouped by layer; attributes are the families.

    Histogram bucket bounds for durations and text length come from the config so operators can
    align them with their SLOs (e.g. the 0.8 s P99 target is a bucket bound by default).
    """

    def __init__(
        self,
        duration_buckets_s: Sequence[float] = DEFAULT_DURATION_BUCKETS_S,
        text_length_buckets: Sequence[float] = TEXT_LENGTH_BUCKETS,
        version: str = "0.1.0",
    ) -> None:
        m = self.metric_set = MetricSet()
        self._overflows_recorded: list[tuple[str, str]] | None = None

        # --- System layer: GPU (NVML or file source), cache disk, the app process.
        self.gpu_up = m.gauge("tts_gpu_up", "1 when the last GPU poll succeeded and is fresh, "
                              "0 when NVML (or the file source) failed or went stale.")
        self.gpu_info = m.gauge("tts_gpu_info", "GPU identity; always 1.", ["gpu", "uuid", "name"])
        self.gpu_memory_used = m.gauge("tts_gpu_memory_used_bytes",
                                       "GPU memory in use, bytes.", ["gpu", "uuid"])
        self.gpu_memory_total = m.gauge("tts_gpu_memory_total_bytes",
                                        "GPU memory installed, bytes.", ["gpu", "uuid"])
        self.gpu_utilization = m.gauge("tts_gpu_utilization_ratio",
                                       "GPU compute utilisation over the last sample, 0-1.",
                                       ["gpu", "uuid"])
        self.gpu_temperature = m.gauge("tts_gpu_temperature_celsius",
                                       "GPU core temperature, degrees Celsius.", ["gpu", "uuid"])
        self.gpu_power = m.gauge("tts_gpu_power_watts", "GPU power draw, watts.",
                                 ["gpu", "uuid"])
        self.gpu_process_memory = m.gauge("tts_gpu_process_memory_bytes",
                                          "GPU memory held by one process, bytes.",
                                          ["gpu", "pid", "process"])
        self.cache_disk_total = m.gauge("tts_cache_disk_total_bytes",
                                        "Size of the filesystem holding the cache dir, bytes.",
                                        ["path"])
        self.cache_disk_free = m.gauge("tts_cache_disk_free_bytes",
                                       "Free space (for unprivileged users) on the filesystem "
                                       "holding the cache dir, bytes.", ["path"])
        self.cache_dir_bytes = m.gauge("tts_cache_dir_bytes",
                                       "Bytes in files under the cache dir.", ["path"])
        self.cache_dir_files = m.gauge("tts_cache_dir_files",
                                       "Number of files under the cache dir.", ["path"])
        self.app_up = m.gauge("tts_app_up", "1 when the app's /status answered the last probe.")
        self.app_restarts = m.counter("tts_app_restarts_total",
                                      "App restarts seen (a new started_at on /status, or a "
                                      "service_start log record).")
        self.app_instances = m.gauge("tts_app_instances",
                                     "The app's model instances by state (healthy: in service; "
                                     "hung: a synthesis past backend.timeout_s still holds it).",
                                     ["state"])
        self.app_log_write_errors = m.counter("tts_app_log_write_errors_total",
                                              "Log records the app could not write (disk full, "
                                              "I/O error), as its /status counts them.")
        self.app_store_up = m.gauge("tts_app_store_up",
                                    "1 when the app's shared store (jobs, Idempotency-Keys, "
                                    "audio cache; Redis) answers, 0 while it falls back to "
                                    "local state (/status store.healthy).")
        self.app_store_fallbacks = m.counter("tts_app_store_fallbacks_total",
                                             "Store calls the app answered from local state "
                                             "because the shared store was down or slow.")

        # --- GPU health next to the gate (NVML; each absent where the GPU cannot report it),
        # which GPUs are followed, and the app's own GPU memory as PyTorch sees it.
        self.gpu_watch_mode = m.gauge("tts_gpu_watch_mode",
                                      "1 for the GPU selection in force: configured is "
                                      "gpu.devices (all, list, auto), mode what is followed now "
                                      "(all, list, app: the app's CUDA devices, none: the app "
                                      "holds no GPU).", ["configured", "mode"])
        self.gpu_sm_clock = m.gauge("tts_gpu_sm_clock_hertz", "GPU streaming-multiprocessor "
                                    "clock, hertz.", ["gpu", "uuid"])
        self.gpu_ecc_uncorrected = m.counter("tts_gpu_ecc_uncorrected_errors_total",
                                             "Uncorrectable ECC memory errors since the driver "
                                             "loaded (NVML volatile count).", ["gpu", "uuid"])
        self.gpu_remapped_rows = m.gauge("tts_gpu_remapped_rows", "GPU memory rows remapped to "
                                         "spares, by the error that caused it (correctable, "
                                         "uncorrectable).", ["gpu", "uuid", "cause"])
        self.gpu_row_remap_pending = m.gauge("tts_gpu_row_remap_pending", "1 while a row remap "
                                             "waits for a GPU reset to take effect.",
                                             ["gpu", "uuid"])
        self.gpu_row_remap_failed = m.gauge("tts_gpu_row_remap_failed", "1 once a row remap has "
                                            "failed (no spare row left): replace the GPU.",
                                            ["gpu", "uuid"])
        self.gpu_clock_event_active = m.gauge("tts_gpu_clock_event_active",
                                              "1 while this reason holds the GPU clocks down "
                                              "(thermal, power brake, HW slowdown, ...).",
                                              ["gpu", "uuid", "reason"])
        self.gpu_xid_errors = m.counter("tts_gpu_xid_errors_total", "XID errors the driver "
                                        "reported (NVML events), by GPU and XID code.",
                                        ["gpu", "uuid", "xid"])
        self.gpu_xid_last_event = m.gauge("tts_gpu_xid_last_event_timestamp_seconds",
                                          "Unix time the sidecar read the last XID error of "
                                          "this code on this GPU.", ["gpu", "uuid", "xid"])
        self.app_gpu_allocated = m.gauge("tts_app_gpu_memory_allocated_bytes",
                                         "GPU memory the app's tensors occupy (PyTorch "
                                         "memory_allocated), by the app's CUDA device.",
                                         ["device", "uuid"])
        self.app_gpu_reserved = m.gauge("tts_app_gpu_memory_reserved_bytes",
                                        "GPU memory PyTorch's caching allocator holds for the "
                                        "app (memory_reserved), by the app's CUDA device.",
                                        ["device", "uuid"])
        self.app_gpu_oom = m.counter("tts_app_gpu_oom_total", "CUDA out-of-memory errors the "
                                     "app reported since it started, by its CUDA device.",
                                     ["device", "uuid"])

        # --- Service layer: HTTP as the app logged it, queue as /status reports it.
        self.http_requests = m.counter("tts_http_requests_total",
                                       "HTTP requests the app served, by route template, "
                                       "status code and the app's error code ('none' on "
                                       "success, 'other' for a code the app does not define).",
                                       ["method", "route", "code", "error"])
        self.http_duration = m.histogram("tts_http_request_duration_seconds",
                                         "HTTP request latency as the app measured it, seconds.",
                                         ["route"], duration_buckets_s)
        self.requests_waiting = m.gauge("tts_requests_waiting",
                                        "Requests queued for a synthesis worker.")
        self.requests_running = m.gauge("tts_requests_running",
                                        "Requests being synthesised now.")
        self.requests_capacity = m.gauge("tts_requests_capacity",
                                         "Model instances: requests that can be synthesised "
                                         "at once.")
        self.queue_size = m.gauge("tts_requests_queue_size",
                                  "Requests that may wait for a model instance (/status "
                                  "queue_size).")
        self.queue_limit = m.gauge("tts_requests_queue_limit",
                                   "Requests admitted at once (running + waiting, /status "
                                   "queue_limit); the next one gets 429 QUEUE_FULL.")

        # --- Business layer: syntheses, stages, text, cache, audio.
        self.syntheses = m.counter("tts_syntheses_total",
                                   "Syntheses finished, by status and error code ('none' on "
                                   "success) and the model version that ran it ('unknown' "
                                   "when the log line does not say).",
                                   ["status", "error_code", "model_version"])
        self.synthesis_duration = m.histogram("tts_synthesis_duration_seconds",
                                              "End-to-end synthesis time, seconds, by text "
                                              "length class (characters: 100, 400, 2000, "
                                              "longer, unknown).", ["length_class"],
                                              duration_buckets_s)
        self.stage_duration = m.histogram("tts_stage_duration_seconds",
                                          "Time spent in one model stage, seconds.", ["stage"],
                                          STAGE_BUCKETS_S)
        self.time_to_first_audio = m.histogram("tts_time_to_first_audio_seconds",
                                               "Time until the first audio chunk was sent "
                                               "(streaming), seconds.", (), FIRST_AUDIO_BUCKETS_S)
        self.queue_wait = m.histogram("tts_queue_wait_seconds",
                                      "Time a synthesis waited for a model instance before it "
                                      "started, seconds.", (), duration_buckets_s)
        self.batch_size = m.histogram("tts_batch_size",
                                      "Size of the model batch each fresh synthesis ran in "
                                      "(1 = alone); counts requests, not model calls.", (),
                                      BATCH_SIZE_BUCKETS)
        self.text_length = m.histogram("tts_text_length_chars",
                                       "Length of the text of each synthesis request, characters.",
                                       (), text_length_buckets)
        self.cache_lookups = m.counter("tts_cache_lookups_total",
                                       "Synthesis requests that looked up the audio cache.")
        self.cache_hits = m.counter("tts_cache_hits_total",
                                    "Synthesis requests served from the audio cache.")
        # Both exported from start-up: a hits series born at the first hit, beside a lookups
        # series that has existed for minutes, is extrapolated by rate() from its own short
        # sampled interval, and the hit ratio read over 100 %. Series that share every scrape
        # are extrapolated alike (alerts/tests/business.yaml shows both cases).
        self.cache_lookups.inc((), 0.0)
        self.cache_hits.inc((), 0.0)
        self.cache_saves = m.counter("tts_cache_saves_total",
                                     "Synthesised audio written to the cache.")
        self.audio_seconds = m.counter("tts_audio_seconds_total",
                                       "Seconds of audio produced; with tts_synthesis_seconds_total"
                                       " gives the real-time factor.")
        self.synthesis_seconds = m.counter("tts_synthesis_seconds_total",
                                           "Seconds spent synthesising successful requests.")
        self.audio_rms = m.histogram("tts_audio_rms", "RMS level of produced audio, 0-1 "
                                     "full scale; near 0 means silence.", (), RMS_BUCKETS)
        self.audio_centroid = m.histogram("tts_audio_spectral_centroid_hertz",
                                          "Spectral centroid of produced audio, hertz; a drop "
                                          "signals muffled or broken audio.", (),
                                          SPECTRAL_CENTROID_BUCKETS_HZ)
        self.audio_bytes = m.counter("tts_audio_bytes_total",
                                     "Bytes of audio the syntheses returned (audio_size_kb "
                                     "of synthesis_complete records).")
        self.synthesis_fallbacks = m.counter("tts_synthesis_fallbacks_total",
                                             "Syntheses that fell back to a substitute (e.g. "
                                             "another voice; fallback_used=true).")
        self.cache_usage = m.gauge("tts_cache_usage_ratio",
                                   "Used share of the cache directory's quota as the app last "
                                   "logged it (cache_dir_usage / cache_health used_percent), "
                                   "0-1, by path.", ["path"])
        self.log_records = m.counter("tts_log_records_total",
                                     "WARNING and ERROR log records, by level and code.",
                                     ["level", "code"])

        # --- Gateway layer: the reverse proxy's access log (nginx JSON format).
        self.gateway_requests = m.counter("tts_gateway_requests_total",
                                          "Requests the gateway answered, by its status code "
                                          "and the last upstream's ('none' when no upstream "
                                          "answered).", ["code", "upstream_code"])
        self.gateway_duration = m.histogram("tts_gateway_request_duration_seconds",
                                            "Request time as the gateway measured it (first "
                                            "byte read to last byte sent), seconds.", (),
                                            duration_buckets_s)
        self.gateway_upstream_duration = m.histogram(
            "tts_gateway_upstream_duration_seconds",
            "Time the gateway waited for upstream responses, all tries of a request together, "
            "seconds.", (), duration_buckets_s)
        self.gateway_empty = m.counter("tts_gateway_empty_responses_total",
                                       "Gateway responses with no body bytes sent (not HEAD, "
                                       "204 or 304): client gave up, upstream died, ...")

        # --- The exporter itself.
        self.log_lines = m.counter("tts_exporter_log_lines_total",
                                   "Log lines read, by outcome; every line gets exactly one.",
                                   ["outcome"])
        self.log_bytes = m.counter("tts_exporter_log_bytes_read_total",
                                   "Bytes of log read.")
        self.log_lag = m.gauge("tts_exporter_log_lag_bytes",
                               "Bytes written to a log file but not yet read.", ["file"])
        self.log_rotations = m.counter("tts_exporter_log_rotations_total",
                                       "Log rotations detected, by kind (rename, truncate, "
                                       "recreate).", ["kind"])
        self.label_overflow = m.counter("tts_exporter_label_overflow_total",
                                        "Observations folded into 'other': a label of a family "
                                        "hit its distinct-value cap (label), or the family its "
                                        "series budget (label='*').", ["family", "label"])
        self.collector_errors = m.counter("tts_exporter_collector_errors_total",
                                          "Failures of a collector (gpu, disk, probe, tail).",
                                          ["collector"])
        self.http_connections_closed = m.counter(
            "tts_exporter_http_connections_closed_total",
            "Connections to the sidecar's HTTP server closed or refused by its bounds, by "
            "reason (header_timeout, evicted, refused, accept_failed).", ["reason"])
        self.build_info = m.gauge("tts_exporter_build_info", "Sidecar version; always 1.",
                                  ["version"])
        self.build_info.set((version,), 1.0)

        # --- The ingress gate.
        self.ingress_open = m.gauge("tts_ingress_open", "1 while the service's ingress is open.")
        self.ingress_closed_reason = m.gauge("tts_ingress_closed_reason",
                                             "1 for each reason currently keeping ingress "
                                             "closed (vram, alert:<name>, manual).", ["reason"])
        self.ingress_transitions = m.counter("tts_ingress_transitions_total",
                                             "Ingress gate transitions, by the state entered.",
                                             ["to"])
        self.ingress_last_transition = m.gauge("tts_ingress_last_transition_timestamp_seconds",
                                               "Unix time of the last gate transition.")

    def updating(self) -> threading.Lock:
        """See :meth:`MetricSet.updating`: hold it around a batch of updates."""
        return self.metric_set.updating()

    def count(self, family: CounterFamily, labels: Labels = (), amount: float = 1.0) -> None:
        """One counter update on its own, under the lock (``amount=0.0`` makes the series
        exist at 0, so ``rate()`` works from the start)."""
        with self.metric_set.updating():
            family.inc(labels, amount)

    def count_error(self, collector: str, amount: float = 1.0) -> None:
        """:meth:`count` ``tts_exporter_collector_errors_total{collector}``."""
        self.count(self.collector_errors, (collector,), amount)

    def log_state(self) -> dict[str, Any]:
        """The log-derived families' values for the checkpoint (hold :meth:`updating`)."""
        return self.metric_set.dump_state(self.log_derived_names())

    def log_derived_names(self) -> list[str]:
        """Counters and histograms fed only by the log pipeline and tailer: the state the
        checkpoint persists next to the offsets."""
        families = [
            self.http_requests, self.http_duration, self.syntheses, self.synthesis_duration,
            self.stage_duration, self.time_to_first_audio, self.queue_wait, self.batch_size,
            self.text_length,
            self.cache_lookups,
            self.cache_hits, self.cache_saves, self.audio_seconds, self.synthesis_seconds,
            self.audio_rms, self.audio_centroid, self.log_records, self.log_lines,
            self.log_bytes, self.log_rotations, self.label_overflow,
            # Counted from service_start records when no probe runs; persisted either way so
            # a sidecar restart neither resets it nor, after kill -9, counts a start twice.
            self.app_restarts,
        ]
        families += [self.audio_bytes, self.synthesis_fallbacks, self.gateway_requests,
                     self.gateway_duration, self.gateway_upstream_duration, self.gateway_empty]
        return [family.name for family in families]

    def log_labelled(self) -> list[_Family]:
        """The families whose label values come from log content."""
        return [self.http_requests, self.http_duration, self.syntheses, self.stage_duration,
                self.log_records, self.cache_usage, self.gateway_requests]

    def limit_log_labels(self, limits: SeriesLimits) -> None:
        """Put ``limits`` on every family of :meth:`log_labelled`."""
        for family in self.log_labelled():
            family.limit(limits, self._overflowed)

    def _overflowed(self, family: str, label: str) -> None:
        recorded = self._overflows_recorded
        if recorded is None:
            self.label_overflow.inc((family, label))
        else:
            recorded.append((family, label))

    @contextmanager
    def recording_overflows(self) -> Iterator[list[tuple[str, str]]]:
        """Overflows (family, label) noted in the list it yields instead of counted: the log
        pipeline decides once what a kind of line does, overflows included, and counts them
        once per line (hold :meth:`updating`)."""
        recorded: list[tuple[str, str]] = []
        self._overflows_recorded = recorded
        try:
            yield recorded
        finally:
            self._overflows_recorded = None

    def log_derived_bound_bytes(self) -> int:
        """The most bytes the :meth:`log_labelled` families can take in ``/metrics`` (text or
        OpenMetrics, exemplars included), whatever the logs hold: every series at its longest,
        every label value made of characters that escape to two bytes (backslash, double quote,
        newline), every bucket carrying an exemplar.
        """
        total = 0
        for family in self.log_labelled():
            series = family.most_series()
            if series < 0:
                raise ValueError(f"{family.name} has no series limits")
            labels = sum(len(name) + 4 + 2 * cap.max_bytes
                         for name, cap in zip(family.labelnames, family.caps, strict=True))
            if isinstance(family, HistogramFamily):
                buckets = len(family.bounds) + 1
                # bucket lines (le label and an exemplar each), then _count and _sum
                line = len(family.name) + 8 + labels + _NUMBER_BYTES + 2
                per_series = buckets * (line + 12 + _EXEMPLAR_BYTES) + 2 * line
            else:
                per_series = len(family.exposed_name) + labels + _NUMBER_BYTES + 4
            total += _FAMILY_HEADER_BYTES + len(family.documentation) + series * per_series
        return total


_NUMBER_BYTES = 24
"""The longest sample value Python writes, e.g. ``-1.7976931348623157e+308``."""
_EXEMPLAR_BYTES = len(' # {request_id=""} ') + 4 * MAX_EXEMPLAR_ID_CHARS + 2 * _NUMBER_BYTES
"""An exemplar at its longest: each character of the id 4 bytes of UTF-8 (or 2, escaped)."""
_FAMILY_HEADER_BYTES = 200
"""# HELP and # TYPE lines (two names, the help text counted apart) and # EOF."""
