"""App probe against a real aiohttp server standing in for the app's ``/status``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.metrics import SidecarMetrics
from exporter.system.probe import AppProbe, AppStatus, ProbeError


class FakeApp:
    """What ``/status`` answers next: a JSON body, a raw body, a status code, or a stall."""

    def __init__(self) -> None:
        self.body: Any = {"waiting": 3, "running": 2, "capacity": 64,
                          "started_at": 1718200000.5, "pid": 4242, "ready": True}
        self.raw: bytes | None = None
        self.status = 200
        self.delay_s = 0.0

    async def status_handler(self, _: web.Request) -> web.Response:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.raw is not None:
            return web.Response(body=self.raw, status=self.status,
                                content_type="application/json")
        return web.json_response(self.body, status=self.status)


@pytest.fixture
async def app_server(aiohttp_server: Any) -> tuple[FakeApp, TestServer]:
    fake = FakeApp()
    app = web.Application()
    app.router.add_get("/status", fake.status_handler)
    return fake, await aiohttp_server(app)


async def started_probe(server: TestServer, timeout_s: float = 1.0) \
        -> tuple[AppProbe, SidecarMetrics]:
    metrics = SidecarMetrics()
    # A long interval: the test calls probe_once itself.
    probe = AppProbe(str(server.make_url("/status")), metrics, interval_s=3600,
                     timeout_s=timeout_s)
    await probe.start()
    return probe, metrics


async def test_up_app_publishes_queue_and_up(app_server: tuple[FakeApp, TestServer]) -> None:
    _, server = app_server
    probe, m = await started_probe(server)
    assert m.app_up.get() == 1.0
    assert (m.requests_waiting.get(), m.requests_running.get(), m.requests_capacity.get()) == \
        (3.0, 2.0, 64.0)
    assert m.app_restarts.get() == 0
    assert m.collector_errors.get(("probe",)) == 0
    await probe.stop()


async def test_a_new_started_at_is_one_restart(app_server: tuple[FakeApp, TestServer],
                                               caplog: pytest.LogCaptureFixture) -> None:
    fake, server = app_server
    probe, m = await started_probe(server)
    await probe.probe_once()
    assert m.app_restarts.get() == 0  # the same process answering again
    fake.body = {**fake.body, "started_at": 1718200100.0, "pid": 5151, "waiting": 0}
    await probe.probe_once()
    await probe.probe_once()
    assert m.app_restarts.get() == 1
    assert m.requests_waiting.get() == 0.0
    assert any("app restarted" in r.getMessage() and "5151" in r.getMessage()
               for r in caplog.records)
    await probe.stop()


async def test_restart_is_detected_without_a_pid(app_server: tuple[FakeApp, TestServer]) -> None:
    fake, server = app_server
    del fake.body["pid"]
    probe, m = await started_probe(server)
    assert m.app_up.get() == 1.0
    fake.body = {**fake.body, "started_at": 1718209999.0}
    await probe.probe_once()
    assert m.app_restarts.get() == 1
    await probe.stop()


async def test_a_restart_across_downtime_is_counted(app_server: tuple[FakeApp, TestServer]) \
        -> None:
    fake, server = app_server
    probe, m = await started_probe(server)
    fake.status = 503
    await probe.probe_once()
    fake.status = 200
    fake.body = {**fake.body, "started_at": 1718300000.0}
    await probe.probe_once()
    assert m.app_up.get() == 1.0
    assert m.app_restarts.get() == 1
    await probe.stop()


@pytest.mark.parametrize(("change", "logged"), [
    ({"status": 500}, "HTTP 500"),
    ({"raw": b"{not json"}, "body is not JSON"),
    ({"body": [1, 2]}, "expected a mapping, got [1, 2]"),
    ({"body": {"waiting": "3", "running": 0, "capacity": 1, "started_at": 1.0}},
     "waiting: expected an integer"),
    ({"body": {"waiting": 1, "running": 0, "capacity": 1, "started_at": True}},
     "started_at: expected a number"),
    ({"delay_s": 0.5}, "no answer within 0.2s"),
])
async def test_failed_probe_is_app_down_without_stale_queue_figures(
        app_server: tuple[FakeApp, TestServer], caplog: pytest.LogCaptureFixture,
        change: dict[str, Any], logged: str) -> None:
    fake, server = app_server
    probe, m = await started_probe(server, timeout_s=0.2)
    assert m.app_up.get() == 1.0
    caplog.set_level(logging.INFO, logger="exporter.probe")
    for key, value in change.items():
        setattr(fake, key, value)
    await probe.probe_once()
    await probe.probe_once()
    assert m.app_up.get() == 0.0
    assert m.collector_errors.get(("probe",)) == 2
    assert m.requests_waiting.get() is None
    assert m.requests_capacity.get() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert logged in warnings[0]
    fake.__init__()  # type: ignore[misc]
    await probe.probe_once()
    assert m.app_up.get() == 1.0
    assert m.requests_waiting.get() == 3.0
    assert any("answers again after 2 failed probes" in r.getMessage() for r in caplog.records)
    await probe.stop()


async def test_app_not_listening_is_down_not_a_crash(unused_tcp_port: int) -> None:
    metrics = SidecarMetrics()
    probe = AppProbe(f"http://127.0.0.1:{unused_tcp_port}/status", metrics, interval_s=3600)
    await probe.start()
    assert metrics.app_up.get() == 0.0
    assert metrics.app_restarts.get() == 0
    await probe.stop()


async def test_probe_keeps_polling_on_its_interval(app_server: tuple[FakeApp, TestServer]) \
        -> None:
    fake, server = app_server
    metrics = SidecarMetrics()
    probe = AppProbe(str(server.make_url("/status")), metrics, interval_s=0.02)
    await probe.start()
    fake.body = {**fake.body, "running": 7}
    for _ in range(100):
        if metrics.requests_running.get() == 7.0:
            break
        await asyncio.sleep(0.02)
    assert metrics.requests_running.get() == 7.0
    await probe.stop()


def test_status_parse_names_the_bad_key() -> None:
    with pytest.raises(ProbeError, match="capacity: missing"):
        AppStatus.parse({"waiting": 1, "running": 1, "started_at": 2.0})
    status = AppStatus.parse({"waiting": 1, "running": 0, "capacity": 4, "started_at": 7})
    assert status.started_at == 7.0
    assert status.pid is None


DEVICE = {"index": 0, "uuid": "GPU-8f3a", "memory_allocated_bytes": 2e9,
          "memory_reserved_bytes": 3e9, "gpu_oom_total": 4}


async def test_the_apps_gpu_memory_is_exported_and_handed_on(
        app_server: tuple[FakeApp, TestServer]) -> None:
    fake, server = app_server
    fake.body = {**fake.body, "gpu_devices": [DEVICE]}
    seen: list[AppStatus] = []
    metrics = SidecarMetrics()
    probe = AppProbe(str(server.make_url("/status")), metrics, interval_s=3600,
                     on_status=seen.append)
    await probe.start()
    key = ("0", "GPU-8f3a")
    assert metrics.app_gpu_allocated.get(key) == 2e9
    assert metrics.app_gpu_reserved.get(key) == 3e9
    assert metrics.app_gpu_oom.get(key) == 4
    assert [d.uuid for d in seen[0].gpu_devices or ()] == ["GPU-8f3a"]
    # A device without PyTorch's figures keeps only what it reported.
    fake.body = {**fake.body, "gpu_devices": [{"uuid": "GPU-8f3a"}]}
    await probe.probe_once()
    assert metrics.app_gpu_allocated.values == {}
    assert metrics.app_gpu_oom.values == {}
    fake.body = {**fake.body, "gpu_devices": [DEVICE]}
    await probe.probe_once()
    fake.status = 503  # a dead app's memory is not a fact any more
    await probe.probe_once()
    assert metrics.app_gpu_reserved.values == {}
    assert metrics.app_gpu_oom.values == {}
    assert len(seen) == 3
    await probe.stop()


@pytest.mark.parametrize(("devices", "problem"), [
    ("GPU-0", "gpu_devices: expected a list"),
    ([DEVICE] * 65, "at most 64 entries"),
    ([7], r"gpu_devices\[0\]: expected a mapping"),
    ([{"uuid": ""}], r"gpu_devices\[0\]\.uuid: expected at least 1 characters"),
    ([{"uuid": "x" * 129}], r"\.uuid: expected at most 128 characters"),
    ([{"uuid": "a", "index": True}], r"\.index: expected an integer"),
    ([{"uuid": "a", "index": 10 ** 400}], r"\.index: expected a value <= 1023"),
    ([{"uuid": "a", "memory_reserved_bytes": float("nan")}], "memory_reserved_bytes: expected"),
    ([{"uuid": "a", "memory_reserved_bytes": 10 ** 400}], r"expected a number, got \d+\.\.\."),
    ([{"uuid": "a", "gpu_oom_total": -1}], r"gpu_oom_total: expected a value >= 0"),
])
def test_a_malformed_gpu_device_list_is_a_failed_probe_naming_the_path(
        devices: Any, problem: str) -> None:
    body = {"waiting": 0, "running": 0, "capacity": 1, "started_at": 1.0,
            "gpu_devices": devices}
    with pytest.raises(ProbeError, match=problem):
        AppStatus.parse(body)


def test_gpu_devices_and_ready_are_optional() -> None:
    status = AppStatus.parse({"waiting": 0, "running": 0, "capacity": 1, "started_at": 1.0})
    assert status.gpu_devices is None
    assert status.ready is True
    status = AppStatus.parse({"waiting": 0, "running": 0, "capacity": 1, "started_at": 1.0,
                              "ready": False, "gpu_devices": []})
    assert status.gpu_devices == ()
    assert status.ready is False
    with pytest.raises(ProbeError, match="ready: expected true or false"):
        AppStatus.parse({"waiting": 0, "running": 0, "capacity": 1, "started_at": 1.0,
                         "ready": "yes"})


async def test_log_write_errors_are_exported_as_the_apps_counter(
        app_server: tuple[FakeApp, TestServer]) -> None:
    fake, server = app_server
    fake.body = {**fake.body, "log_write_errors": 5}
    probe, m = await started_probe(server)
    assert m.app_log_write_errors.get() == 5
    fake.body = {**fake.body, "log_write_errors": 12}
    await probe.probe_once()
    assert m.app_log_write_errors.get() == 12
    fake.body = {**fake.body, "log_write_errors": 3, "started_at": 1718200100.0, "pid": 5151}
    await probe.probe_once()                  # a new process: a counter reset, as Prometheus
    assert m.app_log_write_errors.get() == 3  # reads one
    for bad in ("many", -1):
        fake.body = {**fake.body, "log_write_errors": bad}
        await probe.probe_once()
        assert m.app_up.get() == 0.0
        assert m.app_log_write_errors.get() == 3
    await probe.stop()


async def test_status_without_log_write_errors_still_parses() -> None:
    status = AppStatus.parse({"waiting": 0, "running": 0, "capacity": 1, "started_at": 1.0})
    assert status.log_write_errors is None


async def test_model_instances_by_state_are_exported_and_dropped_with_the_app(
        app_server: tuple[FakeApp, TestServer]) -> None:
    fake, server = app_server
    fake.body = {**fake.body, "instances_healthy": 1, "instances_hung": 1}
    probe, m = await started_probe(server)
    assert m.app_instances.values == {("healthy",): 1.0, ("hung",): 1.0}
    for bad in (-1, 1.5, True, "2"):
        fake.body = {**fake.body, "instances_hung": bad}
        await probe.probe_once()
        assert m.app_up.get() == 0.0
        assert m.app_instances.values == {}   # not a fact any more
    await probe.stop()


async def test_the_apps_store_health_and_fallbacks_are_exported(
        app_server: tuple[FakeApp, TestServer]) -> None:
    fake, server = app_server
    fake.body = {**fake.body, "store": {"kind": "redis", "healthy": True, "fallbacks_total": 0}}
    probe, m = await started_probe(server)
    assert m.app_store_up.get() == 1.0
    assert m.app_store_fallbacks.get() == 0
    fake.body = {**fake.body, "store": {"kind": "redis", "healthy": False,
                                        "fallbacks_total": 42}}
    await probe.probe_once()
    assert m.app_store_up.get() == 0.0
    assert m.app_store_fallbacks.get() == 42
    for bad in ({"healthy": "no", "fallbacks_total": 1}, {"healthy": True,
                                                         "fallbacks_total": -1}, [1]):
        fake.body = {**fake.body, "store": bad}
        await probe.probe_once()
        assert m.app_up.get() == 0.0
        assert m.app_store_up.get() is None
        assert m.app_store_fallbacks.get() == 42
    await probe.stop()


async def test_queue_size_and_limit_are_exported_when_status_has_them(
        app_server: tuple[FakeApp, TestServer]) -> None:
    """Issue 19 #1: tts_requests_capacity is the model instances; 429 starts at
    queue_limit (instances + queue_size), which the Queue panel and TTSQueueBacklog need."""
    fake, server = app_server
    probe, m = await started_probe(server)
    assert not m.queue_limit.values              # an app without the field: no series
    fake.body.update(capacity=2, queue_size=16, queue_limit=18)
    await probe.probe_once()
    assert (m.requests_capacity.get(), m.queue_size.get(), m.queue_limit.get()) == \
        (2.0, 16.0, 18.0)
    fake.status = 500
    await probe.probe_once()
    assert not m.queue_size.values
    assert not m.queue_limit.values
    await probe.stop()


@pytest.mark.parametrize(("change", "problem"), [
    ({"started_at": float("nan")}, "started_at: expected a finite number"),
    ({"started_at": float("inf")}, "started_at: expected a finite number"),
    ({"waiting": -1}, "waiting: expected a value >= 0"),
    ({"pid": 10 ** 400}, "pid: expected a value <= "),
    ({"capacity": 2.5}, "capacity: expected an integer"),
    ({"gpu_devices": [[[[]]]]}, r"gpu_devices\[0\]: expected a mapping"),
])
def test_hostile_status_answers_are_failed_probes_naming_the_path(change: dict,
                                                                  problem: str) -> None:
    body = {"waiting": 0, "running": 0, "capacity": 1, "started_at": 1.0, **change}
    with pytest.raises(ProbeError, match=problem):
        AppStatus.parse(body)


def test_every_problem_of_a_status_answer_is_named_at_once() -> None:
    with pytest.raises(ProbeError) as caught:
        AppStatus.parse({"waiting": "3", "running": -1, "started_at": 1.0})
    assert str(caught.value) == ("waiting: expected an integer, got '3'; running: expected a "
                                 "value >= 0, got -1; capacity: missing")
