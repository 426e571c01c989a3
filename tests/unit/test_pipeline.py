"""Events → metrics, exactly: each contract event's effect, outcomes, caps and exemplars."""

from __future__ import annotations

import json
from math import isfinite
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import LogsConfig, MetricsConfig
from exporter.logs.parsers import Record
from exporter.logs.pipeline import APP_ERROR_CODES, LogPipeline
from exporter.metrics import CounterFamily, HistogramFamily, SidecarMetrics
from exporter.server import build_registry


def pipeline(cap: int = 50, **kwargs: Any) -> tuple[LogPipeline, SidecarMetrics]:
    metrics = SidecarMetrics()
    return LogPipeline(metrics, LogsConfig(), MetricsConfig(label_value_cap=cap), **kwargs), metrics


def jline(**fields: Any) -> bytes:
    fields.setdefault("time", "2026-11-22T10:00:00.000+00:00")
    fields.setdefault("level", "INFO")
    return json.dumps(fields).encode() + b"\n"


def outcomes(metrics: SidecarMetrics) -> dict[str, float]:
    return {labels[0]: value for labels, value in metrics.log_lines.values.items()}


def test_http_request_counts_by_method_route_code_and_observes_latency() -> None:
    p, m = pipeline()
    p.process("app.log", jline(event="http_request", request_id="r1", method="POST",
                               route="/v1/tts", status=200, duration_ms=250))
    assert m.http_requests.get(("POST", "/v1/tts", "200", "none")) == 1
    assert m.http_duration.count(("/v1/tts",)) == 1
    assert m.http_duration.total(("/v1/tts",)) == 0.25


@pytest.mark.parametrize(("fields", "error"), [
    ({"status": 200}, "none"),
    ({"status": 429, "error_code": "QUEUE_FULL"}, "QUEUE_FULL"),
    ({"status": 503, "error_code": "INGRESS_CLOSED"}, "INGRESS_CLOSED"),
    ({"status": 503, "error_code": "GPU_OOM", "outcome": "aborted"}, "GPU_OOM"),
    ({"status": 502}, "other"),                          # a 5xx without a code is not "none"
    ({"status": 503, "error_code": "X" * 300}, "other"),  # not the app's: no new label value
    ({"status": 503, "error_code": 7}, "other"),
])
def test_http_request_error_label_is_the_apps_code_or_none_or_other(
        fields: dict[str, Any], error: str) -> None:
    """Issue 19 #2: shed (QUEUE_FULL, INGRESS_CLOSED, ...) and failed requests are told apart
    by the app's error code; log content cannot add values beyond the error table."""
    p, m = pipeline()
    p.process("a", jline(event="http_request", method="POST", route="/v1/tts", **fields))
    assert m.http_requests.values == {("POST", "/v1/tts", str(fields["status"]), error): 1.0}


def test_app_error_codes_are_the_apps_error_table() -> None:
    from tts_app.errors import ERRORS
    assert set(ERRORS) == APP_ERROR_CODES


@pytest.mark.parametrize(("text_len", "length_class"), [
    (1, "100"), (100, "100"), (101, "400"), (400, "400"), (2000, "2000"), (2001, "longer"),
    (None, "unknown")])
def test_synthesis_latency_is_split_by_text_length_class(text_len: int | None,
                                                         length_class: str) -> None:
    p, m = pipeline()
    p.process("a", jline(event="synthesis_complete", status="success", duration_ms=300,
                         text_len=text_len))
    assert list(m.synthesis_duration.series) == [(length_class,)]


def test_synthesis_complete_feeds_business_metrics() -> None:
    p, m = pipeline()
    p.process("a", jline(event="synthesis_complete", request_id="r1", status="success",
                         duration_ms=500, error_code="none", cache_hit=False, cache_saved=True,
                         audio_duration_ms=2000, text_len=40))
    p.process("a", jline(event="synthesis_complete", request_id="r2", status="success",
                         duration_ms=2, cache_hit=True, audio_duration_ms=2000, text_len=40))
    p.process("a", b"2024-06-12 14:22:38,415 - eng - ERROR - synthesis_complete: id=r3, "
                   b"status=failed, duration_ms=90, error_code=SCIPY_FFT_INVALID, "
                   b"text_len=2048 chars, model_stage=llm_postproc\n")
    assert m.syntheses.get(("success", "none", "unknown")) == 2
    assert m.syntheses.get(("failed", "SCIPY_FFT_INVALID", "unknown")) == 1
    assert m.cache_lookups.get(()) == 3
    assert m.cache_hits.get(()) == 1
    assert m.cache_saves.get(()) == 1
    # Real-time factor counts only syntheses the model did: not the cache hit, not failures.
    assert m.synthesis_seconds.get(()) == 0.5
    assert m.audio_seconds.get(()) == 2.0
    assert m.synthesis_duration.count(("100",)) == 2
    assert m.synthesis_duration.count(("longer",)) == 1
    assert m.text_length.count() == 3
    assert m.log_records.get(("ERROR", "SCIPY_FFT_INVALID")) == 1


def test_stage_first_audio_and_audio_metrics() -> None:
    p, m = pipeline()
    p.process("a", jline(event="stage_time", request_id="r", stage="llm_inference",
                         duration_ms=300)
               + jline(event="first_audio", request_id="r", duration_ms=120)
               + jline(event="audio_metrics", request_id="r", rms=0.1, spectral_centroid=1800))
    assert m.stage_duration.total(("llm_inference",)) == 0.3
    assert m.time_to_first_audio.total() == 0.12
    assert m.audio_rms.total() == 0.1
    assert m.audio_centroid.total() == 1800


def test_warnings_count_by_code_and_service_start_counts_restarts_when_asked() -> None:
    p, m = pipeline()
    p.process("a", jline(event="cache_write_failed", level="WARNING",
                         warning_code="CACHE_WRITE_FAILED")
               + jline(event="service_start", pid=1, version="x"))
    assert m.log_records.get(("WARNING", "CACHE_WRITE_FAILED")) == 1
    assert m.app_restarts.get(()) == 1
    p2, m2 = pipeline(count_restarts=False)
    p2.process("a", jline(event="service_start", pid=1))
    assert m2.app_restarts.get(()) in (None, 0)


def test_every_line_gets_exactly_one_outcome() -> None:
    p, m = pipeline()
    data = (jline(event="http_request", method="GET", route="/x", status=200, duration_ms=1)
            + jline(event="something_new")
            + b"2024-06-12 14:22:38,415 - eng - ERROR - ERROR: scipy.fft failed, len=1024\n"
            + b"Traceback (most recent call last):\n"
            + b"{broken\n"
            + jline(event="stage_time", stage="x", duration_ms="slow"))
    p.process("a", data)
    assert outcomes(m) == {"parsed": 1, "unknown_event": 1, "free_form": 1, "continuation": 1,
                           "malformed": 1, "invalid_field": 1}
    assert m.stage_duration.count(("x",)) == 0


def test_non_finite_numbers_are_invalid_fields_not_observations() -> None:
    """A text value "nan", "inf" or a 400-digit number would make a histogram's _sum NaN or
    inf for good (the totals are checkpointed): such a line is an invalid field instead."""
    p, m = pipeline()
    data = b"".join(
        b"2026-11-22 10:00:00,000 - eng - INFO - stage_time: id=r1, stage=x, duration_ms="
        + value + b"\n" for value in (b"nan", b"inf", b"-Infinity", b"9" * 400, b"5"))
    p.process("a", data)
    assert outcomes(m) == {"parsed": 1, "invalid_field": 4}
    assert m.stage_duration.count(("x",)) == 1


@given(st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), max_size=30))
def test_outcomes_sum_to_lines_for_any_bytes(lines: list[bytes]) -> None:
    p, m = pipeline()
    p.process("a", b"".join(line + b"\n" for line in lines))
    assert sum(outcomes(m).values()) == len(lines)


def test_label_cap_maps_new_values_to_other_and_counts_overflow() -> None:
    p, m = pipeline(cap=2)
    for code in ("A", "B", "C", "D"):
        p.process("a", jline(event="synthesis_complete", status="failed", error_code=code,
                             duration_ms=1))
    assert m.syntheses.get(("failed", "other", "unknown")) == 2
    assert m.label_overflow.get(("tts_syntheses_total", "error_code")) == 2


def test_exemplars_carry_request_ids() -> None:
    p, m = pipeline()
    p.process("a", jline(event="synthesis_complete", request_id="req-42", status="success",
                         duration_ms=700))
    series = m.synthesis_duration.series[("unknown",)]
    assert [e[0] for e in series.exemplars if e] == ["req-42"]


def test_on_records_gets_each_chunks_lines_with_a_request_id_once() -> None:
    seen: list[tuple[str, Record]] = []
    p: LogPipeline    # the callback reads it: declared before the call that builds it

    def record_of(line: str) -> Record:
        record = p.parser.parse(line.encode())
        assert record is not None, line
        return record

    p, _ = pipeline(on_records=lambda source, batch: seen.extend(
        (source, record_of(line)) for _, _, line, _ in batch))
    p.process("app.log", jline(event="stage_time", request_id="r1", stage="s", duration_ms=1)
              + b"  continuation\n" + jline(event="service_start", pid=1)
              + jline(event="synthesis_complete", request_id="r1", status="success"))
    assert [(s, r.request_id, r.event) for s, r in seen] == [
        ("app.log", "r1", "stage_time"), ("app.log", "r1", "synthesis_complete")]
    p.process("app.log", jline(event="service_start", pid=2))
    assert len(seen) == 2


def test_text_lines_with_crlf_count_like_json_lines() -> None:
    p, m = pipeline()
    p.process("a", b"2024-06-12 14:22:38,415 - eng - INFO - stage_time: id=r1, stage=tts, "
                   b"duration_ms=250\r\n"
                   + jline(event="stage_time", request_id="r2", stage="tts", duration_ms=250))
    assert m.stage_duration.count(("tts",)) == 2
    assert m.stage_duration.total(("tts",)) == 0.5
    assert outcomes(m) == {"parsed": 2}


def log_derived(metrics: SidecarMetrics) -> dict[str, Any]:
    """Every log-derived sample but the outcome counter: what one line may change."""
    state = metrics.log_state()
    del state["tts_exporter_log_lines"]
    return state


@pytest.mark.parametrize("bad", [
    {"event": "synthesis_complete", "status": "failed", "error_code": ["GPU_OOM"]},
    {"event": "synthesis_complete", "status": {"ok": 1}, "duration_ms": 5},
    {"event": "http_request", "method": "GET", "route": ["/v1/tts"], "status": 200,
     "duration_ms": 3},
    {"event": "http_request", "method": {"m": "GET"}, "route": "/x", "status": 200},
    {"event": "http_request", "method": "GET", "route": "/x", "status": [500]},
    {"event": "stage_time", "stage": ["llm"], "duration_ms": 10},
    {"event": "something_new", "warning_code": {"nested": [1]}},
])
def test_a_list_or_object_label_value_makes_only_its_line_invalid(bad: dict[str, Any]) -> None:
    """Issue 14 finding 1: an unhashable label value raised TypeError mid-batch, so the lines
    before it lost their outcomes and the lines after it everything."""
    good = [jline(event="synthesis_complete", request_id=f"r{i}", status="success",
                  duration_ms=100, text_len=10, audio_duration_ms=500) for i in range(4)]
    p, m = pipeline()
    p.process("a", good[0] + good[1])
    unchanged = log_derived(m)
    p.process("a", jline(level="ERROR", **bad))
    assert log_derived(m) == unchanged          # no partial update from the bad line
    p.process("a", good[0] + good[1] + jline(level="ERROR", **bad) + good[2] + good[3])
    assert outcomes(m) == {"parsed": 6, "invalid_field": 2}
    assert m.syntheses.get(("success", "none", "unknown")) == 6
    assert m.synthesis_duration.count(("100",)) == 6
    assert m.log_records.values == {}            # the ERROR lines were not counted either
    good_only, expected = pipeline()
    good_only.process("a", b"".join(good[:2]) * 3)
    assert log_derived(m) == log_derived(expected)


def test_null_label_values_count_as_missing_ones() -> None:
    p, m = pipeline()
    p.process("a", jline(event="http_request", method=None, route=None, status=None)
               + jline(event="synthesis_complete", level="ERROR", status=None, error_code=None))
    assert outcomes(m) == {"parsed": 2}
    assert m.http_requests.values == {("", "unknown", "", "none"): 1.0}
    assert m.syntheses.values == {("unknown", "unknown", "unknown"): 1.0}
    assert m.log_records.values == {("ERROR", "none"): 1.0}


@pytest.mark.parametrize(("field", "event"), [
    ("duration_ms", "synthesis_complete"), ("audio_duration_ms", "synthesis_complete"),
    ("text_len", "synthesis_complete"), ("queue_ms", "synthesis_complete"),
    ("duration_ms", "stage_time"), ("duration_ms", "http_request"),
    ("duration_ms", "first_audio"), ("rms", "audio_metrics"),
    ("spectral_centroid", "audio_metrics"),
])
@pytest.mark.parametrize("value", [-1, -0.5, "-250", 1.7e308, 2**64 - 1, "1e309", True])
def test_negative_huge_or_non_number_values_are_invalid_fields(
        field: str, event: str, value: Any) -> None:
    """Issue 14 finding 2: negative values decreased _total counters and _sums, 1.7e308
    pushed them to +Inf for good."""
    p, m = pipeline()
    fields = {"event": event, "request_id": "r", "status": "success", "stage": "s",
              "duration_ms": 100, "audio_duration_ms": 400, "text_len": 5, "rms": 0.1,
              "spectral_centroid": 900, "route": "/x", "method": "GET"}
    p.process("a", jline(**fields))
    unchanged = log_derived(m)
    line = jline(**{**fields, field: value})
    p.process("a", line + line)
    assert outcomes(m) == {"parsed": 1, "invalid_field": 2}
    assert log_derived(m) == unchanged


def test_queue_ms_feeds_the_queue_wait_histogram() -> None:
    p, m = pipeline()
    p.process("a", jline(event="synthesis_complete", request_id="r1", status="success",
                         duration_ms=500, queue_ms=250)
               + b"2024-06-12 14:22:38,415 - eng - INFO - synthesis_complete: id=r2, "
                 b"status=success, duration_ms=90, queue_ms=1500 ms\n")
    assert m.queue_wait.count() == 2
    assert m.queue_wait.total() == 1.75
    assert "tts_queue_wait_seconds" in m.log_derived_names()


def test_batch_size_counts_fresh_syntheses_by_the_batch_they_ran_in() -> None:
    p, m = pipeline()
    p.process("a", jline(event="synthesis_complete", request_id="r1", status="success",
                         duration_ms=500, batch_size=8, cache_hit=False)
               + jline(event="synthesis_complete", request_id="r2", status="success",
                       duration_ms=0, batch_size=8, cache_hit=True)     # a hit ran in no batch
               + jline(event="synthesis_complete", request_id="r3", status="success",
                       duration_ms=5, batch_size=-2)
               + b"2024-06-12 14:22:38,415 - eng - INFO - synthesis_complete: id=r4, "
                 b"status=failed, error_code=GPU_OOM, batch_size=2\n")
    assert m.batch_size.count() == 2
    assert m.batch_size.total() == 10
    assert outcomes(m) == {"parsed": 3, "invalid_field": 1}
    assert "tts_batch_size" in m.log_derived_names()


# --- hostile input: any JSON value in any field of any event ---------------------------------

EVENTS = ["http_request", "synthesis_complete", "synthesis_start", "stage_time", "first_audio",
          "audio_metrics", "service_start", "cache_health", "cache_dir_usage", "infer_done",
          "something_new"]
FIELDS = ["request_id", "id", "level", "status", "result", "duration_ms", "latency_ms",
          "error_code", "code", "warning_code", "cache_hit", "cache_saved", "model_stage",
          "audio_size_kb", "audio_duration_ms", "text_len", "chars", "stage", "rms",
          "spectral_centroid", "method", "route", "endpoint", "queue_ms", "batch_size", "pid",
          "version",
          "time", "voice", "lang"]


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
           | st.sampled_from([2**64 - 1, 10**400, -0.0, 1e308, 1.7e308, 5e-324])
           | st.floats()                         # nan and inf included
           | st.text(max_size=20)                # lone surrogates included
           | st.sampled_from(["success", "200", "-5", "1e309", "nan", "86 chars", '"q"']))
json_values = (st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                            max_leaves=8)
               | st.integers(1, 1500).map(nested)
               | st.integers(0, 70_000).map(lambda n: "r" * n))
records = st.fixed_dictionaries({"event": st.sampled_from(EVENTS) | json_values},
                                optional=dict.fromkeys(FIELDS, json_values))


def as_line(record: dict[str, Any], text_format: bool) -> bytes:
    if not text_format:
        return json.dumps(record).encode("utf-8", "surrogatepass")
    pairs = ", ".join(f"{key}={value}" for key, value in record.items() if key != "event")
    return (f"2026-11-22 10:00:00,000 - eng - {record.get('level', 'ERROR')} - "
            f"{record['event']}: {pairs}").replace("\n", " ").encode("utf-8", "surrogatepass")


def numbers(metrics: SidecarMetrics) -> dict[tuple[Any, ...], float]:
    """Every counter value, histogram bucket count and sum, by family, labels (and slot)."""
    values: dict[tuple[Any, ...], float] = {}
    for family in metrics.metric_set.families():
        if isinstance(family, CounterFamily):
            values.update(((family.name, k), v) for k, v in family.values.items())
        elif isinstance(family, HistogramFamily):
            for k, series in family.series.items():
                values[(family.name, k, "sum")] = series.sum
                values.update(((family.name, k, i), c) for i, c in enumerate(series.counts))
    return values


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(records, st.booleans()), min_size=1, max_size=12),
       st.integers(1, 3))
def test_any_value_in_any_field_costs_one_outcome_and_never_a_decrease(
        lines: list[tuple[dict[str, Any], bool]], batches: int) -> None:
    p, m = pipeline(cap=3)
    data = [as_line(record, text_format) + b"\n" for record, text_format in lines]
    before = numbers(m)
    for batch in range(batches):
        p.process("a", b"".join(data[batch::batches]))
        after = numbers(m)
        assert all(after[key] >= value for key, value in before.items())
        assert all(isfinite(value) for value in after.values())
        before = after
    counted = outcomes(m)
    assert sum(counted.values()) == len(lines)
    assert "error" not in counted            # every failure was an expected, counted one
    # whatever the values, the exposition renders and shows what was counted
    rendered = generate_latest(build_registry(m)).decode()
    assert {sample.labels["outcome"]: sample.value
            for family in text_string_to_metric_families(rendered)
            if family.name == "tts_exporter_log_lines"
            for sample in family.samples if sample.name.endswith("_total")} == counted


# --- issue 18 finding 2: the IndexTTS lines' fields that were dropped ----------------------

def test_indextts_lines_lose_no_field(indextts_lines: bytes) -> None:
    p, m = pipeline()
    p.process("indextts.log", indextts_lines)
    assert outcomes(m) == {"parsed": 5.0}
    # rms/spectral_centroid inside synthesis_complete feed the audio-quality histograms
    assert (m.audio_rms.count(), m.audio_rms.total()) == (1, 0.024)
    assert (m.audio_centroid.count(), m.audio_centroid.total()) == (1, 2150.0)
    assert m.cache_usage.get(("/app/cache",)) == pytest.approx(0.927)
    assert m.synthesis_fallbacks.get() == 1
    assert m.audio_bytes.get() == 124 * 1024
    # the text's length (6 characters), not its bytes, and only once for the request
    assert (m.text_length.count(), m.text_length.total()) == (1, 6.0)
    assert m.syntheses.values == {("success", "none", "unknown"): 3.0}
    assert m.log_records.get(("WARNING", "VOICE_FALLBACK")) == 1


def test_the_text_itself_is_never_exported(indextts_lines: bytes) -> None:
    p, m = pipeline()
    p.process("indextts.log", indextts_lines)
    exposition = generate_latest(build_registry(m)).decode()
    assert "今天" not in exposition
    assert "tts_cache_usage_ratio{path=\"/app/cache\"} 0.927" in exposition


def test_text_length_comes_from_text_when_text_len_is_absent_and_never_twice() -> None:
    p, m = pipeline()
    p.process("a", jline(event="synthesis_start", request_id="r1", text="héllo, \"you\""))
    p.process("a", b'2024-06-12 14:22:37,892 - e - INFO - synthesis_complete: id=r2, '
                   b'status=success, text="a \\"quoted\\", b"\n')
    # the app's own lines: text_len on start and complete, counted on the complete only
    p.process("a", jline(event="synthesis_start", request_id="r3", text_len=40, text="x"))
    p.process("a", jline(event="synthesis_complete", request_id="r3", status="success",
                         text_len=40))
    # 'héllo, "you"' is 12 characters, 'a "quoted", b' 13
    assert (m.text_length.count(), m.text_length.total()) == (3, 12 + 13 + 40)
    p.process("a", jline(event="synthesis_start", request_id="r4", text=["not", "text"]))
    assert outcomes(m)["invalid_field"] == 1


def test_model_version_labels_syntheses_and_is_bounded() -> None:
    p, m = pipeline(cap=3)
    for i in range(6):
        p.process("a", jline(event="synthesis_complete", request_id=f"r{i}", status="success",
                             model_version=f"v{i}"))
    p.process("a", jline(event="synthesis_complete", request_id="r9", status="success"))
    assert m.syntheses.values == {("success", "none", "v0"): 1.0, ("success", "none", "v1"): 1.0,
                                  ("success", "none", "v2"): 1.0,
                                  ("success", "none", "other"): 4.0}
    assert m.label_overflow.get(("tts_syntheses_total", "model_version")) == 4


def test_cache_usage_paths_keep_to_the_series_budget() -> None:
    metrics = SidecarMetrics()
    p = LogPipeline(metrics, LogsConfig(), MetricsConfig(label_value_cap=50,
                                                         max_series_per_family=4))
    for i in range(10):
        p.process("a", jline(event="cache_health", level="WARNING", path=f"/c{i}",
                             used_percent=50 + i))
    assert len(metrics.cache_usage.values) == 5          # 4 paths, then 'other'
    assert metrics.cache_usage.get(("other",)) == pytest.approx(0.59)
    p.process("a", jline(event="cache_dir_usage", path="/c0", used_percent="lots"))
    assert outcomes(metrics)["invalid_field"] == 1
