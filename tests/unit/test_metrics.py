"""The metric primitives: values, histogram cumulation, label cap, checkpoint state."""

from __future__ import annotations

import json

import pytest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from exporter.metrics import OVERFLOW_LABEL_VALUE, LabelCap, MetricSet, SidecarMetrics
from exporter.server import build_registry


def samples(metrics: SidecarMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = build_registry(metrics)
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(text).decode()):
        if family.name.startswith(("process_", "python_")):
            continue  # the process's own readings change between two scrapes
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    metrics = SidecarMetrics(duration_buckets_s=[0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 2.0):
        metrics.http_duration.observe(("/v1/tts",), value)
    got = samples(metrics)
    bucket = "tts_http_request_duration_seconds_bucket"
    assert got[(bucket, (("le", "0.1"), ("route", "/v1/tts")))] == 2
    assert got[(bucket, (("le", "1.0"), ("route", "/v1/tts")))] == 3
    assert got[(bucket, (("le", "+Inf"), ("route", "/v1/tts")))] == 4
    assert got[("tts_http_request_duration_seconds_count", (("route", "/v1/tts"),))] == 4
    assert got[("tts_http_request_duration_seconds_sum", (("route", "/v1/tts"),))] == 2.65


def test_counters_keep_their_total_suffix_in_exposition() -> None:
    metrics = SidecarMetrics()
    metrics.syntheses.inc(("failed", "E_OOM"), 3)
    assert samples(metrics)[("tts_syntheses_total",
                             (("error_code", "E_OOM"), ("status", "failed")))] == 3


def test_exemplar_carries_the_request_id_in_openmetrics() -> None:
    metrics = SidecarMetrics(duration_buckets_s=[1.0])
    metrics.synthesis_duration.observe((), 0.5, "req-42")
    text = openmetrics(build_registry(metrics)).decode()
    line = next(x for x in text.splitlines()
                if x.startswith('tts_synthesis_duration_seconds_bucket{le="1.0"}'))
    assert '# {request_id="req-42"} 0.5' in line


def test_label_cap_maps_new_values_to_other_past_the_cap_and_cuts_long_values() -> None:
    overflowed: list[int] = []
    cap = LabelCap(2, max_bytes=8, on_overflow=lambda: overflowed.append(1))
    admitted = [cap.admit(v, v) for v in ["a", "b", "c", "a", "d", OVERFLOW_LABEL_VALUE]]
    assert admitted == ["a", "b", OVERFLOW_LABEL_VALUE, "a", OVERFLOW_LABEL_VALUE,
                        OVERFLOW_LABEL_VALUE]
    assert len(overflowed) == 2
    wide = LabelCap(5, max_bytes=8, on_overflow=lambda: None)
    assert wide.admit("x", "/v1/" + "é" * 10) == "/v1/éé"      # 8 bytes, no half character
    assert wide.admit("y", "/v1/" + "é" * 20) == "/v1/éé"      # same cut value, one slot
    assert wide.values == {"/v1/éé"}


def test_state_round_trips_through_json() -> None:
    before = SidecarMetrics()
    before.syntheses.inc(("success", "none"), 7)
    before.stage_duration.observe(("llm_inference",), 0.3)
    state = json.loads(json.dumps(before.log_state()))
    after = SidecarMetrics()
    assert after.metric_set.load_state(state) == []
    assert after.syntheses.get(("success", "none")) == 7
    assert after.stage_duration.count(("llm_inference",)) == 1
    assert samples(after) == samples(before)


def test_state_with_changed_buckets_is_dropped_not_misread() -> None:
    before = SidecarMetrics(duration_buckets_s=[0.5, 1.0])
    before.synthesis_duration.observe((), 0.3)
    state = before.log_state()
    after = SidecarMetrics(duration_buckets_s=[0.25, 1.0])
    dropped = after.metric_set.load_state(state)
    assert "tts_synthesis_duration_seconds" in dropped
    assert after.synthesis_duration.count() == 0


def test_defining_a_name_twice_is_refused() -> None:
    registry = MetricSet()
    registry.gauge("tts_x", "x")
    with pytest.raises(ValueError, match="defined twice"):
        registry.counter("tts_x", "again")


def test_cache_hits_and_lookups_are_exported_at_zero_before_any_synthesis() -> None:
    """A hits series born at the first hit is extrapolated by rate() from its own short
    history, beside a lookups series that has existed for minutes: the hit ratio read 103 %
    (alerts/tests/business.yaml). Both exist from start-up, so they share every scrape."""
    got = samples(SidecarMetrics())
    assert got[("tts_cache_lookups_total", ())] == 0
    assert got[("tts_cache_hits_total", ())] == 0


def test_a_checkpoint_without_cache_hits_keeps_the_hits_series_at_zero() -> None:
    """A checkpoint an older sidecar wrote before the first hit saved the hits family with no
    series: restoring it must not take the start-up series away again."""
    after = SidecarMetrics()
    saved = {"tts_cache_lookups": [[[], 5.0]], "tts_cache_hits": []}
    assert after.metric_set.load_state(saved) == []
    got = samples(after)
    assert got[("tts_cache_lookups_total", ())] == 5
    assert got[("tts_cache_hits_total", ())] == 0
