"""The gateway's access log → tts_gateway_* metrics, and each file to the pipeline of its
format (issue 18 finding 1)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.config import ConfigError, LogsConfig, LogSource, MetricsConfig, config_from_mapping
from exporter.logs.gateway import SourceRouter, detect_format, log_sink, upstream_tries
from exporter.logs.pipeline import KeptLine
from exporter.logs.timelines import TimelineStore
from exporter.metrics import SidecarMetrics

GATEWAY_SOURCE = LogSource(paths=["logs/gateway*.log"], format="gateway")


def gline(**fields: Any) -> bytes:
    """An access-log line as config/nginx/tts.conf writes it: every value a string."""
    base = {"event": "gateway_request", "time": "2026-11-22T10:00:01+00:00",
            "request_id": "g1", "method": "POST", "uri": "/v1/tts", "status": "200",
            "upstream_status": "200", "request_time": "0.320",
            "upstream_response_time": "0.300", "upstream_connect_time": "0.001",
            "body_bytes_sent": "5120", "upstream_addr": "127.0.0.1:8080"}
    return json.dumps({**base, **fields}).encode() + b"\n"


def sink(cap: int = 50, kept: list[KeptLine] | None = None,
         sources: list[LogSource] | None = None) -> tuple[SourceRouter, SidecarMetrics]:
    metrics = SidecarMetrics()
    on_records = None if kept is None else (lambda source, lines: kept.extend(lines))
    router = log_sink(metrics, LogsConfig(sources=[GATEWAY_SOURCE] if sources is None
                                          else sources),
                      MetricsConfig(label_value_cap=cap), on_records=on_records)
    return router, metrics


def test_requests_count_by_code_and_last_upstream_code_with_both_durations() -> None:
    router, m = sink()
    router.process("logs/gateway.log", gline() + gline(
        request_id="g2", status="200", upstream_status="502, 200",
        upstream_response_time="0.012, 0.300", request_time="0.330"))
    assert m.gateway_requests.values == {("200", "200"): 2.0}
    assert m.gateway_duration.count() == 2
    assert m.gateway_duration.total() == pytest.approx(0.65)
    assert m.gateway_upstream_duration.total() == pytest.approx(0.3 + 0.312)
    assert m.log_lines.values == {("parsed",): 2.0}


@pytest.mark.parametrize(("value", "tries"), [
    ("0.012, 0.300", ["0.012", "0.300"]),
    ("0.012 : 0.300", ["0.012", "0.300"]),
    ("0.012, 0.200 : 0.300", ["0.012", "0.200", "0.300"]),
    ("-", []), ("-, 0.300", ["0.300"]), ("", []), (None, []), (0.5, ["0.5"]),
])
def test_multi_value_upstream_fields(value: object, tries: list[str]) -> None:
    assert upstream_tries(value, "upstream_response_time") == tries


def test_502_504_and_499_as_nginx_writes_them() -> None:
    router, m = sink()
    router.process("logs/gateway.log", b"".join([
        # app down: connection refused, nginx's own error page
        gline(request_id="a", status="502", upstream_status="502",
              upstream_response_time="0.000", body_bytes_sent="157"),
        # backend too slow: proxy_read_timeout
        gline(request_id="b", status="504", upstream_status="504",
              upstream_response_time="1.001", request_time="1.001", body_bytes_sent="167"),
        # client gave up first: no upstream answer, nothing sent
        gline(request_id="c", status="499", upstream_status="-", upstream_response_time="-",
              request_time="0.500", body_bytes_sent="0"),
        # no upstream at all (gate closed at the proxy)
        gline(request_id="d", status="503", upstream_status="-", upstream_response_time="-",
              upstream_addr="-", body_bytes_sent="86"),
        gline(request_id="e", method="HEAD", body_bytes_sent="0"),
        gline(request_id="f", status="304", body_bytes_sent="0"),
    ]))
    assert m.gateway_requests.values == {("502", "502"): 1.0, ("504", "504"): 1.0,
                                         ("499", "none"): 1.0, ("503", "none"): 1.0,
                                         ("200", "200"): 1.0, ("304", "200"): 1.0}
    assert m.gateway_empty.get() == 1                      # the 499, not HEAD or 304
    assert m.gateway_upstream_duration.count() == 4


def test_bad_lines_cost_only_themselves_and_labels_are_bounded() -> None:
    router, m = sink(cap=3)
    router.process("logs/gateway.log", b"".join([
        b"{not json\n", b"[1]\n", b"\n",
        gline(request_time="-"), gline(upstream_response_time="0.1, nan"),
        gline(request_time="1e400"), gline(status=["x"]), gline(body_bytes_sent="-1"),
        *(gline(status=str(600 + i)) for i in range(6)),
    ]))
    assert m.log_lines.values == {("malformed",): 2.0, ("continuation",): 1.0,
                                  ("invalid_field",): 5.0, ("parsed",): 6.0}
    assert m.gateway_requests.get(("other", "200")) == 3
    assert m.label_overflow.get(("tts_gateway_requests_total", "code")) == 3


def test_gateway_lines_join_the_apps_in_the_request_timeline() -> None:
    kept: list[KeptLine] = []
    router, _ = sink(kept=kept)
    router.process("logs/app.log", json.dumps({
        "time": "2026-11-22T10:00:01.100+00:00", "level": "INFO", "event": "http_request",
        "request_id": "g1", "method": "POST", "route": "/v1/tts", "status": 200,
        "duration_ms": 290}).encode() + b"\n")
    router.process("logs/gateway.log", gline(request_id="g1"))
    store = TimelineStore()
    store.add("x", kept)
    timeline = store.get("g1")
    assert timeline is not None
    assert [r["event"] for r in timeline["records"]] == ["http_request", "gateway_request"]
    assert timeline["records"][1]["fields"]["upstream_status"] == "200"


def test_a_file_no_source_names_is_detected_by_its_first_line() -> None:
    router, m = sink(sources=[])
    router.process("logs/nginx.log", gline())
    router.process("logs/app.log", b'{"time": "2026-11-22T10:00:01Z", "level": "INFO", '
                                   b'"event": "synthesis_complete", "status": "success"}\n')
    assert m.gateway_requests.values == {("200", "200"): 1.0}
    assert m.syntheses.values == {("success", "none", "unknown"): 1.0}
    assert detect_format(b"\n\n") is None
    assert detect_format(b"2024-06-12 14:22:37,892 - a - INFO - x: y=1\n") == "app"


def test_a_source_format_wins_over_detection_and_over_paths() -> None:
    router, m = sink(sources=[LogSource(paths=["logs/odd.log"], format="app")])
    router.process("logs/odd.log", gline())            # looks like the gateway's, is not
    assert m.gateway_requests.values == {}
    assert m.log_lines.values == {("unknown_event",): 1.0}


def test_sources_config_is_validated_and_tailed() -> None:
    config = config_from_mapping({"logs": {"paths": ["logs/app*.log"], "sources": [
        {"paths": ["logs/gateway.log"], "format": "gateway"}]}})
    assert config.logs.tailed_paths() == ["logs/gateway.log", "logs/app*.log"]
    with pytest.raises(ConfigError, match=r"logs.sources\[0\].format: expected one of"):
        config_from_mapping({"logs": {"sources": [{"paths": ["x"], "format": "nginx"}]}})
