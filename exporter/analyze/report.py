"""Aggregate records into the on-call summary with memory bounded regardless of input size.

Durations go into :class:`LogHistogram` (fixed log-spaced buckets, <=1 % relative error on
quantiles) instead of a list of values; per-request state (text length awaiting its
synthesis_complete) lives in a capped LRU; the slowest requests in a bounded heap.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat
from operator import floordiv
from typing import Any

from exporter.logs.gateway import upstream_tries
from exporter.logs.parsers import Record
from exporter.logs.pipeline import InvalidField

_GROWTH = 1.02                       # bucket width: quantile relative error <= 1 %
_LOG_GROWTH = math.log(_GROWTH)
_log = math.log
PENDING_CAP = 100_000                # open requests remembered for their text_len
CODES_CAP = 1000                     # distinct (level, code) and gateway codes; then "other"
MINUTES_CAP = 100_000                # minutes in the failure timeline (about 69 days)
COUNTED_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
GATEWAY_EVENT, REJECTED_EVENT = "gateway_request", "request_rejected"
LENGTH_EDGES = (64, 128, 256, 512, 1024, 2047, 2048, 4096)
EXACT_CAP = 4096                     # up to this many values quantiles are exact


class LogHistogram:
    """Bounded-memory quantile sketch: counts per log-spaced bucket (values <=0 share one).

    The first :data:`EXACT_CAP` values are also kept, so small inputs get exact nearest-rank
    quantiles; past that only the buckets remain (:attr:`exact` says which applies)."""

    __slots__ = ("buckets", "count", "max", "min", "total", "values")

    def __init__(self) -> None:
        self.values: list[float] | None = []
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        values = self.values
        if values is not None:
            values.append(value)
            if len(values) > EXACT_CAP:
                self.values = None
        index = int(_log(value) // _LOG_GROWTH) if value > 0 else -(1 << 30)
        self.buckets[index] += 1

    def extend(self, values: list[float]) -> None:
        """Add many values in order: the same state as :meth:`add` one by one, with the
        bucket indices counted in C (values <= 0 take the one-by-one path)."""
        if not values:
            return
        low = min(values)
        if low <= 0:
            for value in values:
                self.add(value)
            return
        self.count += len(values)
        total = self.total
        for value in values:
            total += value            # in order, as add() sums, so means agree exactly
        self.total = total
        self.min = min(self.min, low)
        self.max = max(self.max, max(values))
        if self.values is not None:
            self.values.extend(values)
            if len(self.values) > EXACT_CAP:
                self.values = None
        self.buckets.update(map(int, map(floordiv, map(_log, values), repeat(_LOG_GROWTH))))

    def merge(self, other: LogHistogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if self.values is not None and other.values is not None \
                and len(self.values) + len(other.values) <= EXACT_CAP:
            self.values.extend(other.values)
        else:
            self.values = None

    def quantile(self, q: float) -> float | None:
        """Bucket-midpoint estimate, clamped to the exact min/max seen."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        if self.values is not None:
            return round(sorted(self.values)[rank - 1], 3)
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                if index == -(1 << 30):
                    return max(self.min, 0.0) if self.min <= 0 else 0.0
                mid = _GROWTH ** (index + 0.5)
                return round(min(max(mid, self.min), self.max), 3)
        return round(self.max, 3)

    @property
    def exact(self) -> bool:
        return self.values is not None

    def summary(self) -> dict[str, Any]:
        return {"count": self.count,
                "mean": round(self.total / self.count, 3) if self.count else None,
                "p50": self.quantile(0.5), "p95": self.quantile(0.95),
                "p99": self.quantile(0.99)}


def as_duration(value: object) -> float | None:
    """A parser-typed duration as the report counts it: an int or float (not a bool) with a
    finite float value; anything else (text, a 400-digit int, inf) is not a duration."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def text_length(fields: Mapping[str, object]) -> object:
    """A record's text_len as the parser typed it; where it has none, the length of its
    ``text`` field (IndexTTS logs the text itself), which the report never keeps."""
    if "text_len" not in fields:
        text = fields.get("text")
        if isinstance(text, str):
            return len(text)
    return fields.get("text_len")


@lru_cache(maxsize=65536)
def length_bucket(text_len: int) -> str:
    """Label for a text length; 2048 gets its own bucket (the seed's failing length)."""
    low = 0
    for edge in LENGTH_EDGES:
        if text_len <= edge:
            return f"{low}-{edge}" if edge - low > 1 else str(edge)
        low = edge + 1
    return f">{LENGTH_EDGES[-1]}"


def _bucket_order(label: str) -> int:
    return 10**9 if label.startswith(">") else int(label.split("-")[0])


@dataclass
class _ErrorCode:
    count: int = 0
    first: float | None = None
    last: float | None = None
    # (time or inf, id) of the earliest failure (ties: the smallest id), so the example does
    # not depend on the order files, formats or workers are read in
    example: tuple[float, str] | None = None

    def offer_example(self, key: tuple[float, str]) -> None:
        if self.example is None or key < self.example:
            self.example = key

    def merge(self, other: _ErrorCode) -> None:
        self.count += other.count
        self.first = other.first if self.first is None or other.first is None else \
            min(self.first, other.first)
        self.last = other.last if self.last is None or other.last is None else \
            max(self.last, other.last)
        if other.example is not None:
            self.offer_example(other.example)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first_seen": self.first, "last_seen": self.last,
                "example_request_id": self.example[1] if self.example else None}


def _note(entry: _ErrorCode, when: float | None, rid: str | None) -> None:
    """One occurrence: count, first/last seen, the earliest request as the example."""
    entry.count += 1
    if when is not None:
        entry.first = when if entry.first is None else min(entry.first, when)
        entry.last = when if entry.last is None else max(entry.last, when)
    if rid:
        entry.offer_example((math.inf if when is None else when, rid))


@dataclass
class Report:
    """Running aggregation; feed records with :meth:`add`, read with :meth:`to_dict`."""

    top: int = 10
    levels: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    durations: LogHistogram = field(default_factory=LogHistogram)
    errors: dict[str, _ErrorCode] = field(default_factory=dict)
    by_length: dict[str, Counter[str]] = field(default_factory=dict)
    by_stage: Counter[str] = field(default_factory=Counter)
    stages: dict[str, LogHistogram] = field(default_factory=dict)
    slowest: list[tuple[float, str]] = field(default_factory=list)
    pending: OrderedDict[str, int] = field(default_factory=OrderedDict)
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (rid, error code or "")
    # WARNING and above by (level, code): rejections, cache warnings, failures
    records: dict[tuple[str, str], _ErrorCode] = field(default_factory=dict)
    # minute (Unix seconds // 60) -> counts of failed, rejected, gateway_5xx
    minutes: dict[int, Counter[str]] = field(default_factory=dict)
    gateway: Counter[tuple[str, str]] = field(default_factory=Counter)  # (code, upstream)
    first_time: float | None = None
    last_time: float | None = None

    def note_time(self, t: float) -> None:
        if self.first_time is None or t < self.first_time:
            self.first_time = t
        if self.last_time is None or t > self.last_time:
            self.last_time = t

    def add(self, record: Record) -> None:
        self.levels[record.level or "NONE"] += 1
        if record.time is not None:
            self.note_time(record.time)
        event = record.event
        if record.level in COUNTED_LEVELS:
            fields = record.fields
            code = fields.get("warning_code") or fields.get("error_code") or "none"
            self.record_code(record.level, str(code), record.time, record.request_id)
        if event == REJECTED_EVENT:
            self.per_minute(record.time, "rejected")
        elif event == GATEWAY_EVENT:
            self.gateway_request(record.fields, record.time)
        if event == "synthesis_complete":
            self.complete(record.request_id, record.fields, record.time)
        elif event == "stage_time":
            self.stage(record.fields.get("stage"), record.fields.get("duration_ms"))
        elif event == "synthesis_start":
            self.note_start(record)

    def record_code(self, level: str, code: str, when: float | None,
                    rid: str | None) -> None:
        """A WARNING/ERROR/CRITICAL record and its code (warning_code, else error_code)."""
        key = (level, code)
        if key not in self.records and len(self.records) >= CODES_CAP:
            key = (level, "other")
        _note(self.records.setdefault(key, _ErrorCode()), when, rid)

    def per_minute(self, when: float | None, what: str, count: int = 1) -> None:
        """``count`` events of kind ``what`` in the minute of ``when`` (no time: not placed)."""
        if when is None or not math.isfinite(when):
            return
        minute = int(when // 60)
        counts = self.minutes.get(minute)
        if counts is None:
            if len(self.minutes) >= MINUTES_CAP:
                return
            counts = self.minutes[minute] = Counter()
        counts[what] += count

    def gateway_request(self, fields: Mapping[str, object], when: float | None) -> None:
        """One line of the gateway's access log (nginx, log_format tts_gateway)."""
        code = str(fields.get("status", "unknown"))
        try:
            tries = upstream_tries(fields.get("upstream_status"), "upstream_status")
        except InvalidField:
            tries = []
        key = (code, tries[-1] if tries else "none")
        if key not in self.gateway and len(self.gateway) >= CODES_CAP:
            key = ("other", "other")
        self.gateway[key] += 1
        if code.startswith("5"):
            self.per_minute(when, "gateway_5xx")

    def note_start(self, record: Record) -> None:
        """Remember a request's text length for its synthesis_complete (also called for
        starts outside --since/--until, so a failure inside the window still gets its length)."""
        self.start(record.request_id, text_length(record.fields))

    def start(self, rid: str | None, text_len: object) -> None:
        """A synthesis_start's id and text_len, as the parser typed them."""
        # the compiled scanner (_scan.c, apply_start) keeps the same map with the same rule
        if rid is not None and isinstance(text_len, int):
            self.pending[rid] = text_len
            if len(self.pending) > PENDING_CAP:
                self.pending.popitem(last=False)

    def stage(self, stage: object, value: object) -> None:
        """A stage_time record's (parser-typed) stage and duration_ms."""
        duration = as_duration(value)
        if isinstance(stage, str) and duration is not None:
            self._stage_hist(stage).add(duration)

    def stage_values(self, stage: str, values: list[float]) -> None:
        """Many stage_time durations of one stage, in file order."""
        self._stage_hist(stage).extend(values)

    def _stage_hist(self, stage: str) -> LogHistogram:
        hist = self.stages.get(stage)
        if hist is None:
            hist = self.stages[stage] = LogHistogram()
        return hist

    def complete(self, rid: str | None, fields: Mapping[str, object],
                 when: float | None) -> None:
        """A synthesis_complete: ``fields`` as the parser types them (only status,
        duration_ms, text_len, error_code and model_stage are read), ``when`` its time."""
        status = str(fields.get("status", "unknown"))
        self.statuses[status] += 1
        duration = as_duration(fields.get("duration_ms"))
        if duration is not None:
            self.durations.add(duration)
            self._offer_slow((duration, rid or ""))
        text_len = text_length(fields)
        start_len = self.pending.pop(rid, None) if rid is not None else None
        if not isinstance(text_len, int) or isinstance(text_len, bool):
            text_len = start_len
        failed = status == "failed"
        code = str(fields.get("error_code") or "UNKNOWN") if failed else ""
        if text_len is not None:
            self.count_length(length_bucket(text_len), code)
        elif rid is not None:
            self.orphan(rid, code)
        if failed:
            self.failure(code, str(fields.get("model_stage") or "unknown"), when, rid)

    def completions(self, statuses: Mapping[str, int], durations: list[float],
                    rids: list[str]) -> None:
        """Many synthesis_complete at once, in file order (the compiled scanner's segments):
        their statuses, and their numeric durations with the request ids they belong to.
        Their lengths, orphans and failures go through :meth:`count_length`, :meth:`orphan`
        and :meth:`failure`, as :meth:`complete` sends them."""
        self.statuses.update(statuses)
        self.durations.extend(durations)
        for item in heapq.nlargest(self.top, zip(durations, rids, strict=True)):
            self._offer_slow(item)

    def _offer_slow(self, item: tuple[float, str]) -> None:
        if item[0] <= 0:            # a cache hit took no synthesis time: not a slow request
            return
        if len(self.slowest) < self.top:
            heapq.heappush(self.slowest, item)
        elif item > self.slowest[0]:
            heapq.heapreplace(self.slowest, item)

    def orphan(self, rid: str, code: str) -> None:
        """A completion whose text length is unknown here: its start may be in an earlier
        file's part (see :meth:`merge`)."""
        if len(self.orphans) < PENDING_CAP:
            self.orphans.append((rid, code))

    def failure(self, code: str, model_stage: str, when: float | None,
                rid: str | None) -> None:
        """A failed synthesis: its error code and model stage, time and request id."""
        self.by_stage[model_stage] += 1
        _note(self.errors.setdefault(code, _ErrorCode()), when, rid)
        self.per_minute(when, "failed")

    def count_length(self, label: str, code: str, count: int = 1) -> None:
        """``count`` completions in the text-length bucket ``label``, failed with ``code``
        ("" for successes)."""
        counts = self.by_length.get(label)
        if counts is None:
            counts = self.by_length[label] = Counter()
        counts["total"] += count
        if code:
            counts["failed"] += count
            counts["code:" + code] += count

    def merge(self, later: Report) -> None:
        """Fold in the report of a later file (parallel mode): sums, min/max, merged
        histograms and heaps; its orphan completions find their start in our pending."""
        self.levels.update(later.levels)
        self.statuses.update(later.statuses)
        self.durations.merge(later.durations)
        for name, hist in later.stages.items():
            self.stages.setdefault(name, LogHistogram()).merge(hist)
        for code, e in later.errors.items():
            self.errors.setdefault(code, _ErrorCode()).merge(e)
        for (level, code), e in later.records.items():
            key = (level, code) if (level, code) in self.records \
                or len(self.records) < CODES_CAP else (level, "other")
            self.records.setdefault(key, _ErrorCode()).merge(e)
        for minute, counts in later.minutes.items():
            for what, n in counts.items():
                self.per_minute(minute * 60.0, what, n)
        for key, n in later.gateway.items():
            if key not in self.gateway and len(self.gateway) >= CODES_CAP:
                key = ("other", "other")
            self.gateway[key] += n
        for label, counts in later.by_length.items():
            self.by_length.setdefault(label, Counter()).update(counts)
        self.by_stage.update(later.by_stage)
        for item in later.slowest:
            self._offer_slow(item)
        for rid, code in later.orphans:
            text_len = self.pending.pop(rid, None)
            if text_len is not None:
                self.count_length(length_bucket(text_len), code)
        for rid, text_len in later.pending.items():
            self.pending[rid] = text_len
            if len(self.pending) > PENDING_CAP:
                self.pending.popitem(last=False)
        for t in (later.first_time, later.last_time):
            if t is not None:
                self.first_time = t if self.first_time is None else min(self.first_time, t)
                self.last_time = t if self.last_time is None else max(self.last_time, t)

    def to_dict(self) -> dict[str, Any]:
        """The stable ``--json`` schema (see render.py for the human form)."""
        syntheses = sum(self.statuses.values())
        failed = self.statuses.get("failed", 0)
        total_errors = sum(e.count for e in self.errors.values())
        errors = sorted(self.errors.items(), key=lambda kv: (-kv[1].count, kv[0]))[: self.top]
        lengths = []
        for label in sorted(self.by_length, key=_bucket_order):
            c = self.by_length[label]
            codes = {k[5:]: v for k, v in c.items() if k.startswith("code:")}
            top_code = max(sorted(codes), key=lambda k: codes[k]) if codes else None
            lengths.append({"bucket": label, "total": c["total"], "failed": c["failed"],
                            "failure_ratio": round(c["failed"] / c["total"], 4),
                            "top_error": top_code,
                            "top_error_share": round(codes[top_code] / c["failed"], 4)
                            if top_code else None})
        return {
            "schema": "tts-analyze/1",
            "time_range": {"first": self.first_time, "last": self.last_time},
            "levels": dict(sorted(self.levels.items())),
            "syntheses": {"total": syntheses, "by_status": dict(sorted(self.statuses.items())),
                          "failure_ratio": round(failed / syntheses, 4) if syntheses else None},
            "duration_ms": {**self.durations.summary(),
                            "method": "exact" if self.durations.exact else
                            "log-bucket histogram, <=1% relative error"},
            "error_codes": [{"code": code, "count": e.count,
                             "share": round(e.count / total_errors, 4),
                             "first_seen": e.first, "last_seen": e.last,
                             "example_request_id": e.example[1] if e.example else None}
                            for code, e in errors],
            "failures_by_text_length": lengths,
            "failures_by_stage": dict(sorted(self.by_stage.items(),
                                             key=lambda kv: (-kv[1], kv[0]))),
            "stages": {name: h.summary() for name, h in sorted(self.stages.items())},
            "slowest": [{"request_id": rid, "duration_ms": d}
                        for d, rid in sorted(self.slowest, reverse=True)],
            "records_by_code": [{"level": level, "code": code, **e.to_dict()}
                                for (level, code), e in sorted(
                                    self.records.items(),
                                    key=lambda kv: (-kv[1].count, kv[0]))[: self.top]],
            "per_minute": [{"minute": minute * 60, "failed": c["failed"],
                            "rejected": c["rejected"], "gateway_5xx": c["gateway_5xx"]}
                           for minute, c in sorted(self.minutes.items())],
            "gateway": None if not self.gateway else {
                "requests": sum(self.gateway.values()),
                "by_code": [{"code": code, "upstream_code": upstream, "count": n}
                            for (code, upstream), n in sorted(
                                self.gateway.items(), key=lambda kv: (-kv[1], kv[0]))]},
        }
