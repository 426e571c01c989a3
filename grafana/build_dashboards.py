"""Write grafana/dashboards/*.json from the panel lists below: the on-call (per pod) and the fleet
dashboard share one set of panel builders, selectors and the shed/failed rule, so the two cannot
drift apart. tests/config_checks checks that the committed JSON is this script's output.

    python grafana/build_dashboards.py          # rewrite the dashboards
    python grafana/build_dashboards.py --check  # exit 1 if they are out of date

On-call panels use short windows (``$__rate_interval``): a 5-minute window kept a recovered
service looking broken for minutes. The alerts keep their own, longer windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
INST = 'instance=~"$instance"'
PROBES = 'route!~"/healthz|/readyz|/status|/metrics"'
"""Probe and health routes: the sidecar's own probe was a third of all requests, all 200."""
TTS = f'{INST}, route="/v1/tts"'
SHED = "QUEUE_FULL|RATE_LIMITED|INGRESS_CLOSED|SHUTTING_DOWN"
"""429 and 503 the service answers to protect itself (the SLO rules' definition)."""
FAILED = f'{TTS}, code=~"5..", error!~"INGRESS_CLOSED|SHUTTING_DOWN"'
W = "[$__rate_interval]"
GREEN, ORANGE, RED = "green", "orange", "red"
RATE_TTS = f"rate(tts_http_requests_total{{{TTS}}}{W})"


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    query: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend,
                             "refId": ref, "range": not instant, "instant": instant}
    return query


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def steps(*pairs: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


def color_by_name(colors: dict[str, str]) -> list[dict[str, Any]]:
    """Overrides giving series whose display name matches a colour (success green, failure
    red), whatever the palette would have picked."""
    return [{"matcher": {"id": "byRegexp", "options": regex},
             "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}
            for regex, color in colors.items()]


def timeseries(title: str, description: str, queries: list[dict[str, Any]], unit: str,
               width: int = 8, height: int = 8, lo: float | None = 0, hi: float | None = None,
               thresholds: dict[str, Any] | None = None, colors: dict[str, str] | None = None,
               stack: bool = False, no_value: str | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit, "color": {"mode": "palette-classic"},
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 30 if stack else 10,
                   "showPoints": "never", "spanNulls": False,
                   "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                   "thresholdsStyle": {"mode": "line+area" if thresholds else "off"}},
        "thresholds": thresholds or steps((GREEN, None))}
    if lo is not None:
        defaults["min"] = lo
    if hi is not None:
        defaults["max"] = hi
    if no_value is not None:
        defaults["noValue"] = no_value
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": queries,
            "fieldConfig": {"defaults": defaults, "overrides": color_by_name(colors or {})},
            "options": {"legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "_size": (width, height)}


def stat(title: str, description: str, queries: list[dict[str, Any]], unit: str,
         thresholds: dict[str, Any], width: int = 4, height: int = 5,
         mappings: list[dict[str, Any]] | None = None, no_value: str | None = None,
         text_mode: str = "value_and_name") -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "mappings": mappings or [],
                                "thresholds": thresholds, "color": {"mode": "thresholds"}}
    if no_value is not None:
        defaults["noValue"] = no_value
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": queries, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"colorMode": "background", "graphMode": "area",
                        "justifyMode": "auto", "textMode": text_mode, "orientation": "auto",
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False}},
            "_size": (width, height)}


def one_zero(one: str, zero: str) -> list[dict[str, Any]]:
    """Value mappings of a 1/0 state: 1 green, 0 red."""
    return [{"type": "value", "options": {"1": {"text": one, "color": GREEN, "index": 0},
                                          "0": {"text": zero, "color": RED, "index": 1}}}]


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids and grid positions, left to right, wrapping at Grafana's 24 columns."""
    x = y = line_height = 0
    for number, panel in enumerate(panels, start=1):
        width, height = panel.pop("_size")
        if x + width > 24 or panel["type"] == "row":
            x, y, line_height = 0, y + line_height, 0
        panel["id"] = number
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        x, line_height = x + width, max(line_height, height)
        if panel["type"] == "row":
            x, y, line_height = 0, y + 1, 0
    return panels


def quantile(q: float, bucket: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({bucket}{W})))"


# --- On-call (one pod, or the pods picked in $instance) ---------------------------------------

# Denominators are kept only above 0: no traffic (or nothing but shed) reads as the panel's
# "no value" text, not as NaN.
SUCCESS = (f'(sum(rate(tts_http_requests_total{{{TTS}, code=~"2.."}}{W}))\n'
           f" or sum({RATE_TTS}) * 0)\n/ (sum({RATE_TTS}) > 0)")
AVAILABILITY = (f"1 - (\n  sum(rate(tts_http_requests_total{{{FAILED}}}{W}))\n"
                f"  or sum({RATE_TTS}) * 0\n)\n"
                f'/ (sum(rate(tts_http_requests_total{{{TTS}, error!~"{SHED}"}}{W})) > 0)')
# The gate stats read series that never vanish while the gate is open (0 instead), so neither
# Grafana's "last not null" nor a range query keeps showing a closing that is over.
GATE_CLOSED_FOR = (f"(time() - tts_ingress_last_transition_timestamp_seconds{{{INST}}})\n"
                   f"* on (instance, job) (1 - tts_ingress_open{{{INST}}})")
# Both sides keep the same labels (no metric name), so a lifted reason continues its own series.
GATE_REASONS = (f"max by (instance, job, reason) (tts_ingress_closed_reason{{{INST}}})\n"
                f"or max by (instance, job, reason) "
                f"(last_over_time(tts_ingress_closed_reason{{{INST}}}[1h])) * 0")
# The gateway (nginx's access log): what clients saw, requests the app never logged included.
# A pod without nginx has no gateway series: its panels say so instead of drawing nothing.
GATEWAY = f"tts_gateway_requests_total{{{INST}}}"


def gateway_ratio(codes: str) -> str:
    """Share of the gateway's answers with a status code matching ``codes``."""
    return (f'(sum(rate(tts_gateway_requests_total{{{INST}, code=~"{codes}"}}{W}))\n'
            f" or sum(rate({GATEWAY}{W})) * 0)\n/ (sum(rate({GATEWAY}{W})) > 0)")


NO_GATEWAY = "no gateway traffic (no nginx on this pod?)"
GATEWAY_P99 = quantile(0.99, f"tts_gateway_request_duration_seconds_bucket{{{INST}}}")
APP_P99 = quantile(0.99, f"tts_http_request_duration_seconds_bucket{{{INST}, {PROBES}}}")
GATEWAY_GAP = f"{GATEWAY_P99}\n- {APP_P99}"
TOP = [
    row("Health: /v1/tts and the gate"),
    stat("/v1/tts success", "Share of POST /v1/tts answered 2xx: what clients got, shed "
         "requests (429, gate 503) included. Short window.",
         targets((SUCCESS, "")), "percentunit",
         steps((RED, None), (ORANGE, 0.9), (GREEN, 0.99)), no_value="no /v1/tts traffic",
         text_mode="value"),
    stat("/v1/tts availability (SLO)", "1 - failed / (all - shed): failed = 5xx other than "
         "INGRESS_CLOSED and SHUTTING_DOWN (aborted streams included), shed = 429 QUEUE_FULL, "
         "RATE_LIMITED and 503 INGRESS_CLOSED, SHUTTING_DOWN. Objective 99.5 %.",
         targets((AVAILABILITY, "")), "percentunit",
         steps((RED, None), (ORANGE, 0.99), (GREEN, 0.995)), no_value="nothing but shed",
         text_mode="value"),
    stat("/v1/tts p99", "99th percentile latency of POST /v1/tts as the app measured it.",
         targets((quantile(0.99, f'tts_http_request_duration_seconds_bucket{{{TTS}}}'), "")),
         "s", steps((GREEN, None), (ORANGE, 0.8), (RED, 2.5)), no_value="no /v1/tts traffic",
         text_mode="value"),
    stat("Ingress gate", "1 = open. Closed: the app answers 503 INGRESS_CLOSED to /v1/tts.",
         targets((f"tts_ingress_open{{{INST}}}", "{{instance}}")), "none",
         steps((RED, None), (GREEN, 1)), mappings=one_zero("open", "CLOSED")),
    stat("Gate closed since", "How long the gate has been closed (0: open).",
         targets((GATE_CLOSED_FOR, "{{instance}}")), "s",
         steps((GREEN, None), (ORANGE, 1), (RED, 600)),
         mappings=[{"type": "value", "options": {"0": {"text": "open", "color": GREEN,
                                                       "index": 0}}}]),
    stat("Gate closed by", "Each reason of the last hour: closing the gate now (red) or lifted "
         "(green); vram, alert:<name>, manual.",
         targets((GATE_REASONS, "{{instance}} {{reason}}")), "none",
         steps((GREEN, None), (RED, 1)), mappings=[{"type": "value", "options": {
             "1": {"text": "closing", "color": RED, "index": 0},
             "0": {"text": "lifted", "color": GREEN, "index": 1}}}],
         no_value="no reason in the last hour"),
    timeseries("/v1/tts answers: served, shed, failed", "Requests per second to POST "
               "/v1/tts by the shed/failed rule of the SLOs; the error label is the app's "
               "code.", targets(
                   (f'sum(rate(tts_http_requests_total{{{TTS}, code=~"2.."}}{W}))', "served"),
                   (f'sum by (error) (rate(tts_http_requests_total{{{TTS}, error=~"{SHED}"}}'
                    f'{W}))', "shed {{error}}"),
                   (f"sum by (error) (rate(tts_http_requests_total{{{FAILED}}}{W}))",
                    "failed {{error}}")),
               "reqps", width=12, stack=True,
               colors={"served": GREEN, "shed .*": ORANGE, "failed .*": RED},
               no_value="no /v1/tts traffic"),
    timeseries("Error budget burn rate", "Failed / not shed, over the 0.5 % budget, per "
               "window of the paging pairs: above 14.4 on 1 h and 5 min (or 6 on 6 h and "
               "30 min) TTSAvailabilityBudgetBurnFast fires.", targets(*[
                   (f"instance:tts_slo_availability_errors:ratio_rate{w}{{{INST}}} / 0.005",
                    f"{{{{instance}}}} {w}") for w in ("5m", "1h", "6h")]),
               "x", width=12, thresholds=steps((GREEN, None), (ORANGE, 6), (RED, 14.4))),
    timeseries("Gateway 502/504 ratio", "Share of requests through nginx answered 502 (the "
               "app refused the connection or died mid-request) or 504 (no answer in time): "
               "the app's own logs may show nothing. TTSGatewayUpstreamErrors: > 5 % for "
               "5 min. 503: the gate closed at nginx (answered there, the app never sees "
               "it) or the app's own 503.", targets((gateway_ratio("502|504"), "502/504"),
                                                    (gateway_ratio("503"), "503")),
               "percentunit", width=12, hi=1, thresholds=steps((GREEN, None), (RED, 0.05)),
               colors={"502/504": RED, "503": ORANGE}, no_value=NO_GATEWAY),
    timeseries("Gateway vs app latency (p99)", "P99 as clients see it at nginx, the app's "
               "own (probe routes left out) and the gap: time lost in front of the app "
               "(TTSGatewayQueueing: gateway over 0.5 s and twice the app's).", targets(
                   (GATEWAY_P99, "gateway p99"), (APP_P99, "app p99"),
                   (GATEWAY_GAP, "gap (gateway - app)")), "s", width=12, lo=None,
               colors={"gap .*": ORANGE}, no_value=NO_GATEWAY),
]

SYSTEM = [
    row("System"),
    timeseries("VRAM used per GPU", "GPU memory used / installed (gpu:tts_gpu_memory_used:"
               "ratio). At 90 % the sidecar closes the ingress and TTSGpuMemoryHigh fires.",
               targets((f"gpu:tts_gpu_memory_used:ratio{{{INST}}}", "{{instance}} GPU {{gpu}}")),
               "percentunit", width=8, hi=1,
               thresholds=steps((GREEN, None), (ORANGE, 0.85), (RED, 0.9))),
    timeseries("VRAM per GPU and per process", "Bytes used and installed per GPU, and what "
               "each process holds (another job on the GPU shows here).", targets(
                   (f"tts_gpu_memory_used_bytes{{{INST}}}", "{{instance}} GPU {{gpu}} used"),
                   (f"tts_gpu_memory_total_bytes{{{INST}}}", "{{instance}} GPU {{gpu}} total"),
                   (f"tts_gpu_process_memory_bytes{{{INST}}}", "GPU {{gpu}} pid {{pid}}"),
                   (f"tts_app_gpu_memory_reserved_bytes{{{INST}}}",
                    "app reserved {{device}}")), "bytes", width=8,
               no_value="no GPU readings"),
    timeseries("Gate timeline", "1 while open; each closing reason is drawn as its own 1.",
               targets((f"tts_ingress_open{{{INST}}}", "{{instance}} open"),
                       (f"tts_ingress_closed_reason{{{INST}}}", "closed by {{reason}}")),
               "none", width=8, hi=1.2, colors={".* open": GREEN, "closed by .*": RED},
               no_value="no gate readings"),
    stat("App", "The sidecar's probe of the app's /status (TTSAppDown).",
         targets((f"tts_app_up{{{INST}}}", "{{instance}}")), "none",
         steps((RED, None), (GREEN, 1)), mappings=one_zero("up", "DOWN"), height=6),
    stat("App restarts (30 min)", "TTSAppRestarting fires at 3.",
         targets((f"increase(tts_app_restarts_total{{{INST}}}[30m])", "{{instance}}")), "none",
         steps((GREEN, None), (ORANGE, 1), (RED, 3)), height=6, no_value="no restart"),
    stat("GPU telemetry", "0: no fresh GPU reading, the VRAM gate is blind.",
         targets((f"tts_gpu_up{{{INST}}}", "{{instance}}")), "none",
         steps((RED, None), (GREEN, 1)), height=6),
    timeseries("GPU utilisation", "", targets(
        (f"tts_gpu_utilization_ratio{{{INST}}}", "{{instance}} GPU {{gpu}}")), "percentunit",
        width=6, height=6, hi=1),
    timeseries("GPU temperature and power", "", targets(
        (f"tts_gpu_temperature_celsius{{{INST}}}", "{{instance}} GPU {{gpu}} °C"),
        (f"tts_gpu_power_watts{{{INST}}}", "{{instance}} GPU {{gpu}} W")), "none", width=6,
        height=6),
    timeseries("Cache disk used", "", targets(
        (f"path:tts_cache_disk_used:ratio{{{INST}}}", "{{instance}} {{path}}")), "percentunit",
        width=6, height=6, hi=1, thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95))),
]

SERVICE = [
    row("Service (probe and health routes left out)"),
    timeseries("Requests by route", "Requests per second, without /healthz, /readyz, "
               "/status and /metrics.", targets(
                   (f"sum by (route) (rate(tts_http_requests_total{{{INST}, {PROBES}}}{W}))",
                    "{{route}}")), "reqps"),
    timeseries("Responses by code and error", "Per second, by status code and the app's error "
               "code ('none' on success).", targets(
                   (f"sum by (code, error) (rate(tts_http_requests_total{{{INST}, {PROBES}}}{W}))",
                    "{{code}} {{error}}")), "reqps",
               colors={"2.. none": GREEN, "5.. .*": RED, "4.. .*": ORANGE}),
    timeseries("5xx ratio", "5xx / all requests (gate 503s included; the availability panel "
               "leaves them out).", targets((
                   f'(sum(rate(tts_http_requests_total{{{INST}, {PROBES}, code=~"5.."}}{W}))\n'
                   f" or sum(rate(tts_http_requests_total{{{INST}, {PROBES}}}{W})) * 0)\n"
                   f"/ (sum(rate(tts_http_requests_total{{{INST}, {PROBES}}}{W})) > 0)", "5xx")),
               "percentunit", hi=1, thresholds=steps((GREEN, None), (RED, 0.05)),
               no_value="no requests"),
    timeseries("Latency P50 / P99 by route", "", targets(
        (quantile(0.5, f"tts_http_request_duration_seconds_bucket{{{INST}, {PROBES}}}",
                  "route, le"), "p50 {{route}}"),
        (quantile(0.99, f"tts_http_request_duration_seconds_bucket{{{INST}, {PROBES}}}",
                  "route, le"), "p99 {{route}}")), "s",
        thresholds=steps((GREEN, None), (RED, 0.8))),
    timeseries("Queue", "Waiting for a model instance, against the queue's slots "
               "(tts_requests_queue_size); 429 QUEUE_FULL at running + waiting = "
               "tts_requests_queue_limit.", targets(
                   (f"sum(tts_requests_waiting{{{INST}}})", "waiting"),
                   (f"sum(tts_requests_queue_size{{{INST}}})", "queue slots"),
                   (f"sum(tts_requests_running{{{INST}}})", "running"),
                   (f"sum(tts_requests_queue_limit{{{INST}}})", "429 limit")), "short",
               colors={"queue slots": ORANGE, "429 limit": RED}, no_value="no /status"),
    timeseries("Queue wait and time to first audio", "P50/P99 of the wait for a model "
               "instance and of the first streamed chunk.", targets(
                   (quantile(0.5, f"tts_queue_wait_seconds_bucket{{{INST}}}"), "queue wait p50"),
                   (quantile(0.99, f"tts_queue_wait_seconds_bucket{{{INST}}}"), "queue wait p99"),
                   (quantile(0.5, f"tts_time_to_first_audio_seconds_bucket{{{INST}}}"),
                    "first audio p50"),
                   (quantile(0.99, f"tts_time_to_first_audio_seconds_bucket{{{INST}}}"),
                    "first audio p99")), "s", no_value="no syntheses"),
]

BUSINESS = [
    row("Business"),
    timeseries("Syntheses by status", "Finished syntheses per second; error_code 'none' on "
               "success.", targets(
                   (f"sum by (status, error_code) (rate(tts_syntheses_total{{{INST}}}{W}))",
                    "{{status}} {{error_code}}")), "ops", stack=True,
               colors={"success .*": GREEN, "failed .*": RED}),
    timeseries("Synthesis latency P99 by text length", "Objectives: up to 100 characters "
               "5 s, 400: 10 s, 2,000: 30 s.", targets(
                   (quantile(0.99, f"tts_synthesis_duration_seconds_bucket{{{INST}}}",
                             "length_class, le"), "≤ {{length_class}} chars")), "s"),
    timeseries("Stage breakdown", "Mean seconds per stage.", targets((
        f"sum by (stage) (rate(tts_stage_duration_seconds_sum{{{INST}}}{W}))\n"
        f"/ sum by (stage) (rate(tts_stage_duration_seconds_count{{{INST}}}{W}))", "{{stage}}")),
        "s", stack=True),
    timeseries("Text length", "Characters per synthesis request.", targets(
        (quantile(0.5, f"tts_text_length_chars_bucket{{{INST}}}"), "p50"),
        (quantile(0.99, f"tts_text_length_chars_bucket{{{INST}}}"), "p99")), "suffix: chars"),
    timeseries("Cache hit ratio", "Syntheses served from the audio cache / all syntheses.",
               targets((f"(sum(rate(tts_cache_hits_total{{{INST}}}{W}))\n"
                        f" or sum(rate(tts_cache_lookups_total{{{INST}}}{W})) * 0)\n"
                        f"/ (sum(rate(tts_cache_lookups_total{{{INST}}}{W})) > 0)", "hit ratio")),
               "percentunit", hi=1, no_value="no syntheses"),
    timeseries("Real-time factor", "Seconds of compute per second of fresh audio (cache hits "
               "excluded); above 1 the service is slower than speech.", targets((
                   f"sum(rate(tts_synthesis_seconds_total{{{INST}}}{W}))\n"
                   f"/ sum(rate(tts_audio_seconds_total{{{INST}}}{W}) > 0)", "RTF")), "none",
               thresholds=steps((GREEN, None), (RED, 1)), no_value="no fresh syntheses"),
    timeseries("Audio level (mean RMS)", "Mean RMS of produced audio (sum / count); near 0 "
               "is silence.", targets((
                   f"sum(rate(tts_audio_rms_sum{{{INST}}}{W}))\n"
                   f"/ sum(rate(tts_audio_rms_count{{{INST}}}{W}))", "mean RMS")), "none"),
    timeseries("Audio spectral centroid", "Mean over 15 min; TTSAudioQualityDrop compares it "
               "with yesterday.", targets((
                   f"instance:tts_audio_spectral_centroid_hertz:mean15m{{{INST}}}",
                   "{{instance}}")),
               "hertz", lo=None),
    timeseries("Warnings and errors logged", "WARNING and ERROR records per second by code "
               "(TTSWarningRateRising: > 0.1/s and 3x the hour before).", targets(
                   (f"sum by (level, code) (rate(tts_log_records_total{{{INST}}}{W}))",
                    "{{level}} {{code}}")), "ops", colors={"ERROR .*": RED}),
]

SIDECAR = [
    row("Sidecar"),
    stat("Sidecar scraped", "Prometheus's up for the sidecar (TTSExporterDown).",
         targets((f'up{{job="tts-exporter", {INST}}}', "{{instance}}")), "none",
         steps((RED, None), (GREEN, 1)), width=4, height=7, mappings=one_zero("up", "DOWN")),
    timeseries("Log lines by outcome", "Every line read gets one outcome.", targets(
        (f"sum by (outcome) (rate(tts_exporter_log_lines_total{{{INST}}}{W}))", "{{outcome}}")),
        "ops", width=5, height=7, stack=True, colors={"parsed": GREEN}),
    timeseries("Log read and lag", "", targets(
        (f"sum(rate(tts_exporter_log_bytes_read_total{{{INST}}}{W}))", "read B/s"),
        (f"tts_exporter_log_lag_bytes{{{INST}}}", "unread {{file}}")), "bytes", width=5,
        height=7),
    timeseries("Collector errors and label overflow", "", targets(
        (f"sum by (collector) (rate(tts_exporter_collector_errors_total{{{INST}}}{W}))",
         "{{collector}} errors"),
        (f"sum by (family, label) (rate(tts_exporter_label_overflow_total{{{INST}}}{W}))",
         "overflow {{family}} {{label}}")), "ops", width=5, height=7,
        no_value="no errors"),
    timeseries("Gate transitions", "", targets(
        (f"sum by (to) (increase(tts_ingress_transitions_total{{{INST}}}{W}))", "to {{to}}")),
        "none", width=5, height=7),
]

# --- Fleet (one line per replica) --------------------------------------------------------------

ONCALL_LINK = [{"title": "Open this pod's on-call dashboard",
                "url": "/d/tts-oncall/tts-on-call?var-instance=${__field.labels.instance}"
                       "&${__url_time_range}"}]


def per_replica(panel: dict[str, Any]) -> dict[str, Any]:
    panel["fieldConfig"]["defaults"]["links"] = ONCALL_LINK
    return panel


FLEET = [
    row("Fleet totals"),
    stat("Replicas up", "Sidecars Prometheus scrapes.",
         targets((f'sum(up{{job="tts-exporter", {INST}}})', "")), "none",
         steps((RED, None), (GREEN, 1)), text_mode="value"),
    stat("Gates closed", "Replicas refusing /v1/tts now.",
         targets((f"count(tts_ingress_open{{{INST}}} == 0) or vector(0)", "")), "none",
         steps((GREEN, None), (ORANGE, 1)), text_mode="value"),
    stat("/v1/tts success", "Fleet share of POST /v1/tts answered 2xx.",
         targets((SUCCESS, "")), "percentunit",
         steps((RED, None), (ORANGE, 0.9), (GREEN, 0.99)), no_value="no /v1/tts traffic",
         text_mode="value"),
    stat("/v1/tts availability (SLO)", "1 - failed / (all - shed), fleet-wide.",
         targets((AVAILABILITY, "")), "percentunit",
         steps((RED, None), (ORANGE, 0.99), (GREEN, 0.995)), no_value="nothing but shed",
         text_mode="value"),
    stat("/v1/tts rate", "", targets((f"sum({RATE_TTS})", "")), "reqps",
         steps((GREEN, None)), text_mode="value"),
    stat("/v1/tts p99", "", targets(
        (quantile(0.99, f'tts_http_request_duration_seconds_bucket{{{TTS}}}'), "")), "s",
        steps((GREEN, None), (ORANGE, 0.8), (RED, 2.5)), text_mode="value"),
    row("Per replica (click a line for its on-call dashboard)"),
    per_replica(timeseries("Gate open", "1 open, 0 closed; reasons below.", targets(
        (f"tts_ingress_open{{{INST}}}", "{{instance}}")), "none", width=8, hi=1.2)),
    per_replica(timeseries("Gate closed by", "1 while the reason closes the gate.", targets(
        (GATE_REASONS, "{{instance}} {{reason}}")), "none", width=8, hi=1.2,
        no_value="no reason in the last hour")),
    per_replica(timeseries("VRAM (fullest GPU)", "", targets(
        (f"max by (instance) (gpu:tts_gpu_memory_used:ratio{{{INST}}})", "{{instance}}")),
        "percentunit", width=8, hi=1,
        thresholds=steps((GREEN, None), (ORANGE, 0.85), (RED, 0.9)))),
    per_replica(timeseries("/v1/tts rate", "", targets(
        (f"sum by (instance) ({RATE_TTS})", "{{instance}}")), "reqps")),
    per_replica(timeseries("/v1/tts p99", "", targets(
        (quantile(0.99, f'tts_http_request_duration_seconds_bucket{{{TTS}}}', "instance, le"),
         "{{instance}}")), "s", thresholds=steps((GREEN, None), (RED, 0.8)))),
    per_replica(timeseries("/v1/tts failed (of not shed)", "Failed / (all - shed), per "
                           "replica.", targets((
                               f"sum by (instance) (rate(tts_http_requests_total{{{FAILED}}}"
                               f"{W}))\n/ (sum by (instance) (rate(tts_http_requests_total"
                               f'{{{TTS}, error!~"{SHED}"}}{W})) > 0)', "{{instance}}")),
                           "percentunit", hi=1, thresholds=steps((GREEN, None), (RED, 0.005)),
                           no_value="no failures")),
    per_replica(timeseries("/v1/tts shed", "429 and gate 503 per second, per replica.",
                           targets((f"sum by (instance) (rate(tts_http_requests_total{{{TTS}, "
                                    f'error=~"{SHED}"}}{W}))', "{{instance}}")), "reqps",
                           no_value="nothing shed")),
    per_replica(timeseries("Queue fill", "Waiting / queue slots; 1 = next request gets 429.",
                           targets((f"tts_requests_waiting{{{INST}}} / (tts_requests_queue_size"
                                    f"{{{INST}}} > 0)", "{{instance}}")), "percentunit", hi=1,
                           thresholds=steps((GREEN, None), (ORANGE, 0.5), (RED, 1)),
                           no_value="no queue size on /status")),
    per_replica(timeseries("Gateway 502/504 ratio", "Requests through nginx answered 502 or "
                           "504, per replica.", targets((
                               f'(sum by (instance) (rate(tts_gateway_requests_total{{{INST}, '
                               f'code=~"502|504"}}{W}))\n or sum by (instance) (rate({GATEWAY}'
                               f"{W})) * 0\n)\n/ (sum by (instance) (rate({GATEWAY}{W})) > 0)",
                               "{{instance}}")), "percentunit", hi=1,
                           thresholds=steps((GREEN, None), (RED, 0.05)), no_value=NO_GATEWAY)),
]

GATE_ANNOTATION = {
    "name": "Ingress gate", "datasource": DS, "enable": True, "iconColor": RED,
    # One mark per transition, at its own time (useValueForTime). The sidecar's start-up sets
    # the timestamp without a transition: nothing is drawn until the first real one.
    "expr": (f"tts_ingress_last_transition_timestamp_seconds{{{INST}}} * 1000\n"
             f"* on (instance, job) group_left (state) (\n"
             f"    label_replace(tts_ingress_open{{{INST}}} == 0, \"state\", \"closed\", \"\", "
             f"\"\") + 1\n"
             f"  or label_replace(tts_ingress_open{{{INST}}} == 1, \"state\", \"opened\", \"\", "
             f"\"\")\n)\n"
             f"and on (instance, job) (sum by (instance, job) "
             f"(tts_ingress_transitions_total{{{INST}}}) > 0)"),
    "step": "$__interval", "useValueForTime": True, "titleFormat": "Ingress {{state}}",
    "textFormat": "{{instance}}", "tagKeys": "state,instance"}
BUILTIN_ANNOTATION = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                      "name": "Annotations & Alerts", "type": "dashboard"}
VARIABLES = [
    {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
     "refresh": 1, "hide": 0, "includeAll": False, "multi": False, "options": [], "regex": "",
     "skipUrlSync": False},
    {"name": "instance", "label": "Sidecar", "type": "query", "datasource": DS,
     "query": {"query": "label_values(tts_exporter_build_info, instance)", "refId": "instance"},
     "refresh": 2, "hide": 0, "includeAll": True, "multi": True, "allValue": ".*",
     "options": [], "regex": "", "sort": 1, "skipUrlSync": False},
]


def link(title: str, url: str) -> dict[str, Any]:
    """A dashboard link that keeps the time range and the picked sidecars."""
    return {"title": title, "type": "link", "url": url, "icon": "dashboard", "tags": [],
            "asDropdown": False, "includeVars": True, "keepTime": True, "targetBlank": False,
            "tooltip": ""}


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
              links: list[dict[str, Any]]) -> dict[str, Any]:
    return {"uid": uid, "title": title, "description": description,
            "tags": ["tts", "tts-sentinel", "on-call"], "editable": True, "graphTooltip": 1,
            "schemaVersion": 39, "version": 1, "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "timezone": "browser",
            "fiscalYearStartMonth": 0, "liveNow": False, "links": links,
            "annotations": {"list": [BUILTIN_ANNOTATION, GATE_ANNOTATION]},
            "templating": {"list": VARIABLES}, "panels": layout(panels)}


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        "tts-oncall.json": dashboard(
            "tts-oncall", "TTS on-call",
            "tts-sentinel, one pod: is /v1/tts healthy and is the gate open (top row), then "
            "system, service, business and the sidecar itself. Runbooks: alerts/runbooks.md.",
            TOP + SYSTEM + SERVICE + BUSINESS + SIDECAR,
            [link("Fleet", "/d/tts-fleet/tts-fleet")]),
        "tts-fleet.json": dashboard(
            "tts-fleet", "TTS fleet",
            "tts-sentinel, every replica: totals, then one line per replica; a line links to "
            "that pod's on-call dashboard.", FLEET,
            [link("On-call (one pod)", "/d/tts-oncall/tts-on-call")]),
    }


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path, text = HERE / "dashboards" / name, render(board)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print("out of date: " + ", ".join(stale) + " (run build_dashboards.py)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
