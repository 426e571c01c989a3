"""The on-call loop for real: app + sidecar + Prometheus + Alertmanager on 127.0.0.1.

VRAM (the sidecar's ``file:`` GPU source) crosses 90 %: the sidecar's own gate closes first
(within a second), then TTSGpuMemoryHigh fires through Prometheus and Alertmanager, whose
webhook adds its reason to the gate, and the app answers 503. VRAM drops: the alert resolves,
both reasons lift, the gate reopens, the app serves again. Then every recording rule and every
dashboard expression is run against that Prometheus, fed by the traffic the test sent.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.support.local_stack import REPO, Stack, StackOptions, http_get, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.external]

ALERT = "TTSGpuMemoryHigh"


def gate_state(stack: Any) -> tuple[int, dict[str, Any]]:
    status, body = http_get(stack.url("exporter", "/ingress"))
    return status, json.loads(body)


def firing_alerts(stack: Any) -> set[str]:
    _, body = http_get(stack.url("alertmanager", "/api/v2/alerts?active=true"))
    return {a["labels"]["alertname"] for a in json.loads(body) if a["status"]["state"] == "active"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    options = StackOptions(
        scrape_interval="1s", evaluation_interval="1s", max_alert_for="2s", group_wait="1s",
        gate_reopen_after_s=1.0)
    with Stack(tmp_path_factory.mktemp("stack"), options) as running:
        yield running


def gateway_line(status: str, upstream: str) -> str:
    """One access-log line as nginx writes it with the shipped ``log_format tts_gateway``."""
    return json.dumps({
        "event": "gateway_request", "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                                                          time.gmtime()),
        "request_id": f"gw{time.monotonic_ns()}", "method": "POST", "uri": "/v1/tts",
        "status": status, "upstream_status": upstream, "request_time": "0.020",
        "upstream_response_time": "0.015" if upstream != "-" else "-",
        "upstream_connect_time": "0.001", "body_bytes_sent": "4096",
        "upstream_addr": "127.0.0.1:8080"}) + "\n"


def send_traffic(stack: Any) -> None:
    # The gateway's access log beside the app's (no nginx in this stack; the real one is
    # tests/deploy/test_gateway_nginx.py): its recording rules and panels need requests too.
    with (stack.workdir / "logs" / "gateway.access.log").open("a") as log:
        log.writelines([gateway_line("200", "200")] * 5 + [gateway_line("502", "-")])
    for i in range(6):
        assert stack.synthesize(f"Traffic sentence number {i}.")[0] == 200
    assert stack.synthesize("Traffic sentence number 0.")[0] == 200  # a cache hit
    assert stack.synthesize("")[0] == 400
    assert stack.synthesize("Streaming is not needed here.", voice="no-such-voice")[0] == 422


def test_vram_crossing_closes_the_gate_alerts_and_reopens(stack: Any) -> None:
    send_traffic(stack)
    assert gate_state(stack)[0] == 200

    crossed = time.monotonic()
    stack.set_vram(0.95)
    wait_until(lambda: gate_state(stack)[0] == 503, timeout=1.0,
               what="the local gate to close within a second")
    local_close = time.monotonic() - crossed
    _, headers, _ = wait_until(
        lambda: (r := stack.synthesize("Gate closed?"))[0] == 503 and r, timeout=2.0,
        what="the app to answer 503")
    assert int(headers["Retry-After"]) > 0

    def alert_reason_added() -> bool:
        return f"alert:{ALERT}" in gate_state(stack)[1]["reasons"]

    wait_until(alert_reason_added, timeout=30, interval=0.2,
               what="Alertmanager's webhook to add its reason")
    assert ALERT in firing_alerts(stack)
    assert set(gate_state(stack)[1]["reasons"]) >= {"vram", f"alert:{ALERT}"}
    alert_close = time.monotonic() - crossed
    assert local_close < alert_close

    stack.set_vram(0.50)
    wait_until(lambda: gate_state(stack)[0] == 200, timeout=40, interval=0.2,
               what="the alert to resolve and the gate to reopen")
    wait_until(lambda: stack.synthesize("Open again.")[0] == 200, timeout=3,
               what="the app to serve again")
    closes = wait_until(
        lambda: stack.query('tts_ingress_transitions_total{to="closed"}'),
        timeout=5, what="Prometheus to scrape the transition")
    assert float(closes[0]["value"][1]) >= 1


def recording_rule_names() -> list[str]:
    import yaml

    rules = yaml.safe_load((REPO / "alerts" / "tts.rules.yaml").read_text())
    return [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]


def dashboard_expressions() -> list[tuple[str, str, bool]]:
    """(where, expression, may be empty) of every panel and annotation: a panel that says what
    its being empty means (noValue: "open", "no failures") may have no series in a calm
    service, but its queries must still run."""
    exprs = []
    for path in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = list(dashboard.get("panels", []))
        while panels:
            panel = panels.pop()
            panels.extend(panel.get("panels", []))
            may_be_empty = bool(panel.get("fieldConfig", {}).get("defaults", {}).get("noValue"))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    exprs.append((f"{path.name}: {panel.get('title')}", target["expr"],
                                  may_be_empty))
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if annotation.get("expr"):
                exprs.append((f"{path.name}: annotation {annotation.get('name')}",
                              annotation["expr"], True))
    return exprs


def substitute_grafana_variables(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    expr = expr.replace("$__range", "5m")
    return re.sub(r"\$\{?(\w+)(:\w+)?\}?", ".*", expr)


def test_every_recording_rule_and_dashboard_expression_returns_data(stack: Any) -> None:
    send_traffic(stack)
    names = recording_rule_names()
    assert names, "no recording rules found"
    expressions = dashboard_expressions()
    assert expressions, "no dashboard expressions found"

    def all_answer() -> list[str]:
        missing = [n for n in names if not stack.query(n)]
        missing += [title for title, e, may_be_empty in expressions
                    if not stack.query(substitute_grafana_variables(e)) and not may_be_empty]
        return missing

    deadline = time.monotonic() + 30
    missing = all_answer()
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = all_answer()
    assert not missing, f"no data for: {missing}"
