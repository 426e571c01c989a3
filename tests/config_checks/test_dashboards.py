"""grafana/: every dashboard type-checks against @grafana/schema (grafana/check), every query
parses as PromQL, reads only series the sidecar exports or the rules record, and follows the
data source and instance variables; the provisioning files point at what is shipped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.config_checks.artefacts import (
    DASHBOARDS,
    GRAFANA_CHECK,
    PROMETHEUS_SERIES,
    REPO,
    DashboardQuery,
    all_dashboard_queries,
    exported_metric_names,
    metric_names,
    panels,
    recording_rule_names,
    selectors,
    substitute_variables,
)

QUERIES = all_dashboard_queries()


def query_id(query: DashboardQuery) -> str:
    return f"{query.dashboard}:{query.where}:{query.raw.get('refId', '')}"


def run_grafana_check(*paths: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed (make test installs nodejs and npm)")
    assert (GRAFANA_CHECK / "node_modules" / "@grafana" / "schema").is_dir(), \
        "grafana/check has no node_modules: run `npm ci` in grafana/check (make test does)"
    return subprocess.run([node, "check-dashboards.mjs", *map(str, paths)], cwd=GRAFANA_CHECK,
                          capture_output=True, text=True, timeout=120, check=False)


def test_there_are_an_on_call_and_a_fleet_dashboard_with_queries() -> None:
    assert [path.name for path in DASHBOARDS] == ["tts-fleet.json", "tts-oncall.json"]
    assert len(QUERIES) >= 40


def test_dashboards_are_the_generators_output() -> None:
    """grafana/build_dashboards.py is the source; nobody edits the JSON by hand."""
    result = subprocess.run([sys.executable, str(REPO / "grafana" / "build_dashboards.py"),
                             "--check"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_every_dashboard_type_checks_against_grafana_schema() -> None:
    result = run_grafana_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok: {len(DASHBOARDS)} dashboard(s)" in result.stdout


@pytest.mark.slow
def test_grafana_check_rejects_a_broken_dashboard(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARDS[0].read_text())
    dashboard["schemaVersion"] = "39"
    first_timeseries = next(p for p in panels(dashboard) if p["type"] == "timeseries")
    first_timeseries["targets"][0]["exp"] = first_timeseries["targets"][0].pop("expr")
    first_timeseries["fieldConfig"]["defaults"]["thresholds"]["mode"] = "absolut"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(dashboard, indent=2))
    result = run_grafana_check(broken)
    assert result.returncode == 1
    for expected in ("'string' is not assignable to type 'number'", "'\"exp\"' does not exist",
                     "'\"absolut\"' is not assignable"):
        assert expected in result.stderr
    assert "broken.json:" in result.stderr


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_query_parses_as_promql(query: DashboardQuery) -> None:
    metric_names(substitute_variables(query.expr))


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_query_reads_only_exported_or_recorded_series(query: DashboardQuery) -> None:
    known = exported_metric_names() | recording_rule_names() | PROMETHEUS_SERIES
    unknown = metric_names(substitute_variables(query.expr)) - known
    assert not unknown, f"{query.where} reads {unknown}"


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_query_follows_the_instance_variable(query: DashboardQuery) -> None:
    for name, matchers in selectors(query.expr.replace("$__rate_interval", "1m")
                                    .replace("$__interval", "15s")):
        assert matchers.get("instance") == "=~$instance", f"{query.where}: {name} {matchers}"


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_query_uses_the_datasource_variable(query: DashboardQuery) -> None:
    assert query.raw["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_has_datasource_and_instance_variables(path: Path) -> None:
    variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["includeAll"]
    assert instance["multi"]
    assert instance["allValue"] == ".*"
    for name in metric_names(instance["query"]["query"].replace("label_values(", "group(")
                             .replace(", instance)", ")")):
        assert name in exported_metric_names()


def on_call() -> dict[str, Any]:
    return json.loads((REPO / "grafana" / "dashboards" / "tts-oncall.json").read_text())


def test_on_call_dashboard_rows_and_the_vram_line() -> None:
    dashboard = on_call()
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Health: /v1/tts and the gate", "System",
                    "Service (probe and health routes left out)", "Business", "Sidecar"]
    vram = next(p for p in panels(dashboard) if p["title"].startswith("VRAM used"))
    assert "gpu:tts_gpu_memory_used:ratio" in vram["targets"][0]["expr"]
    steps = vram["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert {"color": "red", "value": 0.9} in steps
    annotations = [a for a in dashboard["annotations"]["list"] if "expr" in a]
    assert any("tts_ingress_open" in a["expr"] for a in annotations)


def test_the_top_row_says_whether_v1_tts_is_healthy_and_why_the_gate_is_closed() -> None:
    """Issue 19 #1: "App up" stayed green while every /v1/tts got 503."""
    top = [p["title"] for p in on_call()["panels"][1:7]]
    assert top == ["/v1/tts success", "/v1/tts availability (SLO)", "/v1/tts p99",
                   "Ingress gate", "Gate closed since", "Gate closed by"]


def test_the_top_row_shows_the_gateways_502_504_ratio_and_latency_gap() -> None:
    """Issue 19 #1: what clients got at nginx (502/504 the app never logged, time lost in
    front of it) belongs on the top row; a pod without nginx has no gateway series, so both
    panels say what empty means (the alert loop accepts only those empty)."""
    dashboard = on_call()["panels"]
    second_row = next(i for i, p in enumerate(dashboard) if p["type"] == "row" and i > 0)
    top = {p["title"]: p for p in dashboard[1:second_row]}
    errors, latency = top["Gateway 502/504 ratio"], top["Gateway vs app latency (p99)"]
    assert re.search(r'tts_gateway_requests_total\{[^}]*code=~"502\|504"',
                     errors["targets"][0]["expr"])
    assert "tts_gateway_request_duration_seconds_bucket" in latency["targets"][2]["expr"]
    assert "tts_http_request_duration_seconds_bucket" in latency["targets"][2]["expr"]
    for panel in (errors, latency):
        assert panel["fieldConfig"]["defaults"]["noValue"]
    fleet = json.loads((REPO / "grafana" / "dashboards" / "tts-fleet.json").read_text())
    assert any(p["title"] == "Gateway 502/504 ratio" for p in panels(fleet))


# Panels that show an alert's own window on purpose, or look back for the reasons to list.
LONG_WINDOW_PANELS = {"App restarts (30 min)", "Error budget burn rate",
                      "Audio spectral centroid", "Gate closed by"}


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_on_call_panels_use_short_windows(query: DashboardQuery) -> None:
    """Issue 19 #1: 5-minute windows kept the 5xx ratio at 18 % minutes after recovery."""
    if any(f"panel {title!r}" == query.where for title in LONG_WINDOW_PANELS):
        return
    assert "5m" not in query.expr, query.where
    assert "15m" not in query.expr, query.where
    windows = set(re.findall(r"\[([^\]]+)\]", query.expr))
    assert windows <= {"$__rate_interval"}, f"{query.where}: {windows}"


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_request_panels_leave_out_probe_and_health_routes(query: DashboardQuery) -> None:
    for name, matchers in selectors(substitute_variables(query.expr)):
        if name.startswith("tts_http_request"):
            assert matchers.get("route") in {'=/v1/tts', '!~/healthz|/readyz|/status|/metrics'}, \
                f"{query.where}: {name} {matchers}"


def test_provisioning_points_at_a_prometheus_and_a_dashboard_folder() -> None:
    provisioning = REPO / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://127.0.0.1:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "tts-sentinel.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"
    assert providers["providers"][0]["options"]["path"]
