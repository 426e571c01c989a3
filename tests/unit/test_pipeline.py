"""Events → metrics, exactly: each contract event's effect, outcomes, caps and exemplars."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from exporter.config import Config, LogsConfig, MetricsConfig
from exporter.logs.parsers import Record
from exporter.logs.pipeline import LogPipeline
from exporter.metrics import SidecarMetrics


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
    assert m.http_requests.get(("POST", "/v1/tts", "200")) == 1
    assert m.http_duration.count(("/v1/tts",)) == 1
    assert m.http_duration.total(("/v1/tts",)) == 0.25


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
    assert m.syntheses.get(("success", "none")) == 2
    assert m.syntheses.get(("failed", "SCIPY_FFT_INVALID")) == 1
    assert m.cache_lookups.get(()) == 3
    assert m.cache_hits.get(()) == 1
    assert m.cache_saves.get(()) == 1
    # Real-time factor counts only syntheses the model did: not the cache hit, not failures.
    assert m.synthesis_seconds.get(()) == 0.5
    assert m.audio_seconds.get(()) == 2.0
    assert m.synthesis_duration.count() == 3
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
    assert m.syntheses.get(("failed", "other")) == 2
    assert m.label_overflow.get(("error_code",)) == 2


def test_exemplars_carry_request_ids() -> None:
    p, m = pipeline()
    p.process("a", jline(event="synthesis_complete", request_id="req-42", status="success",
                         duration_ms=700))
    series = m.synthesis_duration.series[()]
    assert [e[0] for e in series.exemplars if e] == ["req-42"]


def test_on_records_gets_each_chunks_lines_with_a_request_id_once() -> None:
    seen: list[tuple[str, Record]] = []
    p, _ = pipeline(on_records=lambda source, batch: seen.extend(
        (source, p.parser.parse(line.encode())) for _, _, line, _ in batch))
    p.process("app.log", jline(event="stage_time", request_id="r1", stage="s", duration_ms=1)
              + b"  continuation\n" + jline(event="service_start", pid=1)
              + jline(event="synthesis_complete", request_id="r1", status="success"))
    assert [(s, r.request_id, r.event) for s, r in seen] == [
        ("app.log", "r1", "stage_time"), ("app.log", "r1", "synthesis_complete")]
    p.process("app.log", jline(event="service_start", pid=2))
    assert len(seen) == 2


def test_config_defaults_build_a_pipeline() -> None:
    config = Config()
    LogPipeline(SidecarMetrics(), config.logs, config.metrics).process("a", b"\n")


def test_text_lines_with_crlf_count_like_json_lines() -> None:
    p, m = pipeline()
    p.process("a", b"2024-06-12 14:22:38,415 - eng - INFO - stage_time: id=r1, stage=tts, "
                   b"duration_ms=250\r\n"
                   + jline(event="stage_time", request_id="r2", stage="tts", duration_ms=250))
    assert m.stage_duration.count(("tts",)) == 2
    assert m.stage_duration.total(("tts",)) == 0.5
    assert outcomes(m) == {"parsed": 2}
