"""The ingress gate: hysteresis and reasons on a fake clock, then its HTTP surface, gate file and
metrics over a real socket."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import AuthConfig, GateConfig
from exporter.gate import Gate, GateComponent, GateState, WebhookError, parse_webhook
from exporter.metrics import SidecarMetrics
from exporter.server import build_app
from tests.conftest import FakeClock


def make_gate(clock: FakeClock, **kwargs: Any) -> tuple[Gate, list[GateState]]:
    options: dict[str, Any] = {"close_at": 0.90, "reopen_below": 0.85, "reopen_after_s": 30.0,
                               "on_gpu_failure": "hold", "stale_after_s": 2.0}
    options.update(kwargs)
    gate = Gate(**options, clock=clock, wall_clock=clock)
    transitions: list[GateState] = []
    gate.subscribe(lambda old, new: transitions.append(new) if old.open != new.open else None)
    return gate, transitions


def feed(gate: Gate, clock: FakeClock, ratios: list[float], step_s: float = 0.25) -> None:
    gate.observe_gpus(ratios)
    clock.advance(step_s)


# --- Hysteresis ------------------------------------------------------------------------------


def test_closes_on_the_first_reading_at_close_at() -> None:
    clock = FakeClock()
    gate, transitions = make_gate(clock)
    feed(gate, clock, [0.899])
    assert gate.state.open
    feed(gate, clock, [0.90])
    assert not gate.state.open
    assert gate.reasons == {"vram"}
    assert len(transitions) == 1
    assert transitions[0].since == clock.now - 0.25


def test_reopens_only_after_the_hold_time_below_reopen_below() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock)
    feed(gate, clock, [0.95])
    for _ in range(int(30 / 0.25)):  # 30 s at 0.80, the first of them starts the hold
        assert not gate.state.open
        feed(gate, clock, [0.80])
    gate.observe_gpus([0.80])
    assert gate.state.open


def test_a_reading_between_thresholds_restarts_the_hold() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock)
    feed(gate, clock, [0.95])
    for _ in range(100):  # 25 s low
        feed(gate, clock, [0.80])
    feed(gate, clock, [0.86])  # above reopen_below, below close_at: streak broken
    for _ in range(100):
        feed(gate, clock, [0.80])
    assert not gate.state.open
    for _ in range(21):
        feed(gate, clock, [0.80])
    assert gate.state.open


def test_sawtooth_around_ninety_percent_closes_once_and_never_flaps() -> None:
    clock = FakeClock()
    gate, transitions = make_gate(clock, reopen_after_s=5.0)
    for i in range(4000):  # 1000 s of a load bouncing 88 % <-> 92 % every poll
        feed(gate, clock, [0.88 if i % 2 else 0.92])
    assert [t.open for t in transitions] == [False]


def test_sawtooth_dipping_below_reopen_shorter_than_hold_stays_closed() -> None:
    clock = FakeClock()
    gate, transitions = make_gate(clock, reopen_after_s=5.0)
    for i in range(2000):  # 4 s at 80 %, 1 s at 95 %: never 5 s low in a row
        feed(gate, clock, [0.95 if i % 20 >= 16 else 0.80])
    assert [t.open for t in transitions] == [False]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=300),
       st.sampled_from([0.0, 0.5, 2.0]))
def test_hysteresis_invariants_hold_for_any_reading_sequence(readings: list[float],
                                                             hold_s: float) -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock, reopen_after_s=hold_s)
    history: list[tuple[float, float]] = []
    for ratio in readings:
        was_open = gate.state.open
        gate.observe_gpus([ratio])
        history.append((clock.now, ratio))
        if ratio >= 0.90:
            assert not gate.state.open
        if gate.state.open and not was_open:
            # Reopened: every reading of the last hold_s seconds was at or below 0.85.
            window = [r for t, r in history if t >= clock.now - hold_s]
            assert all(r <= 0.85 for r in window)
        clock.advance(0.25)


def test_any_gpu_closes_and_all_must_be_low_to_reopen() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock, reopen_after_s=1.0)
    feed(gate, clock, [0.10, 0.91, 0.20])
    assert gate.reasons == {"vram"}
    for _ in range(20):
        feed(gate, clock, [0.10, 0.80, 0.87])  # the third GPU keeps it closed
    assert not gate.state.open
    for _ in range(5):
        feed(gate, clock, [0.10, 0.80, 0.85])
    assert gate.state.open


def test_zero_hold_reopens_on_the_first_low_reading() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock, reopen_after_s=0.0)
    feed(gate, clock, [0.95])
    assert not gate.state.open
    feed(gate, clock, [0.85])
    assert gate.state.open


# --- Reasons ---------------------------------------------------------------------------------


def test_gate_opens_only_when_every_reason_is_gone() -> None:
    clock = FakeClock()
    gate, transitions = make_gate(clock, reopen_after_s=0.0)
    feed(gate, clock, [0.95])
    since = gate.state.since
    gate.set_manual(closed=True)
    gate.apply_alerts([("VramHigh", "fp1", True)])
    assert gate.reasons == {"vram", "manual", "alert:VramHigh"}
    assert gate.state.since == since  # more reasons on a closed gate: not a transition
    feed(gate, clock, [0.10])
    gate.set_manual(closed=False)
    assert gate.reasons == {"alert:VramHigh"}
    assert not gate.state.open
    gate.apply_alerts([("VramHigh", "fp1", False)])
    assert gate.state.open
    assert [t.open for t in transitions] == [False, True]


def test_alert_reason_stays_until_every_series_of_the_alert_resolved() -> None:
    gate, _ = make_gate(FakeClock())
    gate.apply_alerts([("GpuHot", "gpu0", True), ("GpuHot", "gpu1", True)])
    gate.apply_alerts([("GpuHot", "gpu0", False)])
    assert gate.reasons == {"alert:GpuHot"}
    gate.apply_alerts([("GpuHot", "gpu1", False), ("GpuHot", "gpu1", False)])
    assert gate.state.open


def test_manual_open_does_not_lift_vram() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock)
    feed(gate, clock, [0.99])
    gate.set_manual(closed=False)
    assert gate.reasons == {"vram"}


# --- Failed and stale readings ---------------------------------------------------------------


def fail_for(gate: Gate, clock: FakeClock, seconds: float) -> None:
    for _ in range(int(seconds / 0.25)):
        gate.gpu_failed()
        clock.advance(0.25)


def test_policy_close_closes_once_readings_are_stale_and_needs_a_full_hold_to_reopen() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock, on_gpu_failure="close", reopen_after_s=1.0)
    feed(gate, clock, [0.10])
    fail_for(gate, clock, 1.5)  # within stale_after_s: one hiccup changes nothing
    assert gate.state.open
    fail_for(gate, clock, 1.0)
    assert gate.reasons == {"vram"}
    for _ in range(4):
        feed(gate, clock, [0.10])
    assert not gate.state.open
    feed(gate, clock, [0.10])
    assert gate.state.open


def test_policy_close_closes_when_no_reading_ever_arrived() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock, on_gpu_failure="close")
    fail_for(gate, clock, 2.5)
    assert gate.reasons == {"vram"}


def test_policy_hold_keeps_an_open_gate_open_and_a_closed_one_closed() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock, on_gpu_failure="hold", reopen_after_s=1.0)
    feed(gate, clock, [0.10])
    fail_for(gate, clock, 60)
    assert gate.state.open
    feed(gate, clock, [0.95])
    feed(gate, clock, [0.10])
    feed(gate, clock, [0.10])
    fail_for(gate, clock, 60)  # failures also break the "continuously low" streak
    assert not gate.state.open
    for _ in range(4):
        feed(gate, clock, [0.10])
    assert not gate.state.open
    feed(gate, clock, [0.10])
    assert gate.state.open


def test_policy_ignore_treats_failures_as_healthy() -> None:
    clock = FakeClock()
    gate, _ = make_gate(clock, on_gpu_failure="ignore", reopen_after_s=1.0)
    feed(gate, clock, [0.95])
    assert not gate.state.open
    fail_for(gate, clock, 1.5)
    assert gate.state.open


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="on_gpu_failure"):
        Gate(on_gpu_failure="panic")


# --- Webhook payload parsing -----------------------------------------------------------------


def alert(name: str, status: str = "firing", action: str | None = "close_ingress",
          fingerprint: object = None, **labels: str) -> dict[str, Any]:
    all_labels = {"alertname": name, **labels}
    if action:
        all_labels["action"] = action
    body: dict[str, Any] = {"status": status, "labels": all_labels, "annotations": {},
                            "startsAt": "2024-06-12T14:22:38Z", "endsAt": "0001-01-01T00:00:00Z"}
    if fingerprint:
        body["fingerprint"] = fingerprint
    return body


def payload(*alerts: dict[str, Any], version: Any = "4") -> dict[str, Any]:
    return {"version": version, "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing",
            "receiver": "tts-gate", "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://am", "alerts": list(alerts)}


def test_parse_webhook_keeps_only_close_ingress_alerts() -> None:
    updates = parse_webhook(payload(alert("VramHigh", fingerprint="f1"),
                                    alert("DiskFull", action="page"),
                                    alert("VramHigh", "resolved", gpu="1")))
    assert updates[0] == ("VramHigh", "f1", True)
    assert updates[1][0::2] == ("VramHigh", False)
    assert '"gpu"' in updates[1][1]
    assert len(updates) == 2


@pytest.mark.parametrize(("body", "problem"), [
    ([], "expected a mapping, got []"),
    (payload(version="3"), "version"),
    ({**payload(), "alerts": {}}, "list"),
    (payload("x"), "alerts[0]: expected a mapping"),  # type: ignore[arg-type]
    (payload(alert("A", status="pending")), "alerts[0].status"),
    (payload({"status": "firing", "labels": {"alertname": 1}}), "alerts[0].labels"),
    (payload({"status": "firing", "labels": {"action": "close_ingress"}}), "alertname"),
])
def test_parse_webhook_rejects_malformed_payloads(body: Any, problem: str) -> None:
    with pytest.raises(WebhookError, match=re.escape(problem)):
        parse_webhook(body)


def test_parse_webhook_names_every_bad_alert_at_once() -> None:
    with pytest.raises(WebhookError) as caught:
        parse_webhook(payload(alert("A", status="pending"), alert("B"),
                              {"status": "firing", "labels": {"alertname": 10 ** 400}}))
    assert [key for key, _ in caught.value.problems] == ["alerts[0].status",
                                                        "alerts[2].labels.alertname"]


def test_a_webhook_with_thousands_of_bad_alerts_names_twenty() -> None:
    with pytest.raises(WebhookError) as caught:
        parse_webhook(payload(*[{"status": "firing"}] * 5000))
    assert len(caught.value.problems) == 21
    assert caught.value.problems[-1] == ("...", "and 4980 more problems")


@pytest.mark.parametrize("body", [
    b"[" * 30_000 + b"]" * 30_000,                               # deep nesting
    json.dumps(payload({"status": "firing", "labels": {"alertname": "A", "x": [[[]]]}})).encode(),
    b'{"version": "4", "alerts": [{"status": "firing", "labels": {"alertname": NaN}}]}',
    json.dumps(payload(alert("A", fingerprint=12))).encode(),
    b'{"version": 4, "alerts": []}',
])
async def test_hostile_webhook_bodies_are_400(
        gate_http: tuple[GateComponent, SidecarMetrics, TestClient], body: bytes) -> None:
    component, _, client = gate_http
    response = await client.post("/alertmanager", data=body, headers=AUTH)
    assert response.status == 400, await response.text()
    assert component.gate.state.open


# --- The component over HTTP -----------------------------------------------------------------

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_component(tmp_path: Path, token: str = TOKEN, **gate_options: Any) \
        -> tuple[GateComponent, SidecarMetrics, FakeClock]:
    clock = FakeClock(1_700_000_000.0)
    config = GateConfig(gate_file=str(tmp_path / "state" / "ingress.json"), reopen_after_s=0.0,
                        **gate_options)
    gate = Gate.from_config(config, stale_after_s=2.0, clock=clock, wall_clock=clock)
    metrics = SidecarMetrics()
    return GateComponent(gate, config, AuthConfig(bearer_token=token), metrics), metrics, clock


@pytest.fixture
async def gate_http(tmp_path: Path, aiohttp_client: Any) \
        -> tuple[GateComponent, SidecarMetrics, TestClient]:
    component, metrics, _ = make_component(tmp_path)
    await component.start()
    client = await aiohttp_client(build_app(metrics, component.routes))
    return component, metrics, client


def read_gate_file(component: GateComponent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(component.gate_file.read_text())
    return data


async def test_get_ingress_is_200_when_open_and_503_with_retry_after_when_closed(
        gate_http: tuple[GateComponent, SidecarMetrics, TestClient]) -> None:
    component, _, client = gate_http
    response = await client.get("/ingress")
    assert response.status == 200
    assert await response.json() == {"open": True, "reasons": [],
                                      "since": component.gate.state.since}
    component.gate.observe_gpus([0.97])
    response = await client.get("/ingress")
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert (await response.json())["reasons"] == ["vram"]
    # a proxy's auth_request (nginx takes only 2xx/401/403) gets 403 in this mode too
    response = await client.get("/ingress?for=auth_request")
    assert response.status == 403
    assert (await response.json())["reasons"] == ["vram"]


async def test_auth_request_mode_answers_403_when_closed(tmp_path: Path,
                                                         aiohttp_client: Any) -> None:
    component, metrics, _ = make_component(tmp_path, mode="auth_request")
    await component.start()
    client = await aiohttp_client(build_app(metrics, component.routes))
    component.gate.set_manual(closed=True)
    response = await client.get("/ingress")
    assert response.status == 403
    assert "Retry-After" not in response.headers


async def test_webhook_firing_closes_and_resolved_opens(
        gate_http: tuple[GateComponent, SidecarMetrics, TestClient]) -> None:
    component, metrics, client = gate_http
    response = await client.post("/alertmanager", json=payload(alert("VramHigh", fingerprint="a")),
                                 headers=AUTH)
    assert response.status == 200
    assert (await client.get("/ingress")).status == 503
    assert read_gate_file(component)["reasons"] == ["alert:VramHigh"]
    assert metrics.ingress_closed_reason.get(("alert:VramHigh",)) == 1.0
    await client.post("/alertmanager", json=payload(alert("VramHigh", "resolved", fingerprint="a")),
                      headers=AUTH)
    assert (await client.get("/ingress")).status == 200
    assert read_gate_file(component)["open"] is True


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Basic {TOKEN}"}, 401),
])
@pytest.mark.parametrize("route", ["/alertmanager", "/ingress"])
async def test_wrong_or_missing_token_is_401_and_changes_nothing(
        gate_http: tuple[GateComponent, SidecarMetrics, TestClient], route: str,
        headers: dict[str, str], status: int) -> None:
    component, _, client = gate_http
    before = component.gate_file.stat().st_mtime_ns
    body = payload(alert("X")) if route == "/alertmanager" else {"action": "close",
                                                                 "reason": "x"}
    response = await client.post(route, json=body, headers=headers)
    assert response.status == status
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert component.gate.state.open
    assert component.gate_file.stat().st_mtime_ns == before


async def test_no_token_configured_is_403(tmp_path: Path, aiohttp_client: Any) -> None:
    component, metrics, _ = make_component(tmp_path, token="")
    await component.start()
    client = await aiohttp_client(build_app(metrics, component.routes))
    for route in ("/alertmanager", "/ingress"):
        response = await client.post(route, json={"action": "close", "reason": "x"},
                                     headers={"Authorization": "Bearer "})
        assert response.status == 403
    assert component.gate.state.open


async def test_token_file_is_read_per_request(tmp_path: Path, aiohttp_client: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    component, metrics, _ = make_component(tmp_path)
    component.auth = AuthConfig(bearer_token="ignored", bearer_token_file=str(token_file))
    await component.start()
    client = await aiohttp_client(build_app(metrics, component.routes))
    body = {"action": "close", "reason": "drill"}
    assert (await client.post("/ingress", json=body,
                              headers={"Authorization": "Bearer first"})).status == 200
    token_file.write_text("second")  # rotated
    assert (await client.post("/ingress", json=body,
                              headers={"Authorization": "Bearer first"})).status == 401


@pytest.mark.parametrize("body", [
    b"not json",
    json.dumps(payload(alert("A"), version="3")).encode(),
    json.dumps(payload(alert("A"), {"status": "firing"})).encode(),  # 2nd alert bad: none applied
])
async def test_malformed_webhook_is_400_and_changes_nothing(
        gate_http: tuple[GateComponent, SidecarMetrics, TestClient], body: bytes) -> None:
    component, _, client = gate_http
    before = component.gate_file.read_bytes()
    response = await client.post("/alertmanager", data=body, headers=AUTH)
    assert response.status == 400
    assert "error" in await response.json()
    assert component.gate.state.open
    assert component.gate_file.read_bytes() == before


async def test_manual_override_closes_and_opens(
        gate_http: tuple[GateComponent, SidecarMetrics, TestClient]) -> None:
    component, metrics, client = gate_http
    response = await client.post("/ingress", json={"action": "close", "reason": "deploy"},
                                 headers=AUTH)
    assert response.status == 200
    assert (await response.json())["reasons"] == ["manual"]
    assert (await client.get("/ingress")).status == 503
    assert read_gate_file(component) == {"open": False, "reasons": ["manual"],
                                         "since": component.gate.state.since,
                                         "retry_after_s": 5}
    response = await client.post("/ingress", json={"action": "open"}, headers=AUTH)
    assert (await response.json())["open"] is True
    assert metrics.ingress_transitions.get(("closed",)) == 1.0
    assert metrics.ingress_transitions.get(("open",)) == 1.0
    assert metrics.ingress_open.get() == 1.0
    assert metrics.ingress_last_transition.get() == component.gate.state.since


@pytest.mark.parametrize("body", [
    {"action": "close"},
    {"action": "close", "reason": "  "},
    {"action": "toggle", "reason": "x"},
    {"action": "open", "reason": 3},
    ["close"],
])
async def test_manual_override_rejects_bad_bodies(
        gate_http: tuple[GateComponent, SidecarMetrics, TestClient], body: Any) -> None:
    component, _, client = gate_http
    response = await client.post("/ingress", json=body, headers=AUTH)
    assert response.status == 400
    assert component.gate.state.open


async def test_gate_file_is_written_at_start_and_readable_by_others(tmp_path: Path) -> None:
    component, metrics, _ = make_component(tmp_path)
    await component.start()
    assert read_gate_file(component)["open"] is True
    assert stat.S_IMODE(component.gate_file.stat().st_mode) == 0o644
    assert metrics.ingress_open.get() == 1.0
    assert metrics.ingress_transitions.get(("closed",)) == 0.0
    assert [p.name for p in component.gate_file.parent.iterdir()] == ["ingress.json"]


async def test_unwritable_gate_file_is_counted_not_fatal(tmp_path: Path) -> None:
    component, metrics, _ = make_component(tmp_path)
    await component.start()
    os.chmod(component.gate_file.parent, 0o500)
    try:
        if os.access(component.gate_file.parent, os.W_OK):
            pytest.skip("running as root: permissions do not stop the write")
        component.gate.set_manual(closed=True)
    finally:
        os.chmod(component.gate_file.parent, 0o700)
    assert metrics.collector_errors.get(("gate",)) == 1.0
    assert metrics.ingress_open.get() == 0.0


@pytest.mark.slow
async def test_gate_file_is_always_valid_json_for_a_concurrent_reader(tmp_path: Path) -> None:
    component, _, _ = make_component(tmp_path)
    await component.start()
    stop = threading.Event()
    seen: set[bool] = set()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                data = json.loads(component.gate_file.read_bytes())
                seen.add(data["open"])
                assert set(data) == {"open", "reasons", "since", "retry_after_s"}
            except Exception as exc:  # any torn read is a failure
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(3000):
            component.gate.set_manual(closed=i % 2 == 0)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen == {True, False}
    assert [p.name for p in component.gate_file.parent.iterdir()] == ["ingress.json"]
