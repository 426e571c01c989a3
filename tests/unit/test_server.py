"""The HTTP surface over a real socket: landing page, health, exposition formats."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from exporter.config import AuthConfig, GateConfig
from exporter.gate import Gate, GateComponent
from exporter.metrics import SidecarMetrics
from exporter.server import OffLoop, build_app, build_registry
from tests.unit.conftest import gate_latencies_while_hammered


@pytest.fixture
async def client(aiohttp_client) -> TestClient:
    metrics = SidecarMetrics()
    metrics.http_requests.inc(("POST", "/v1/tts", "200"), 5)
    metrics.http_duration.observe(("/v1/tts",), 0.42, "req-1")
    metrics.gpu_memory_used.set(("0", "GPU-abc"), 1.5e9)
    return await aiohttp_client(build_app(metrics))


async def test_landing_page_links_metrics(client: TestClient) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert 'href="/metrics"' in await response.text()


async def test_healthz_answers_ok(client: TestClient) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_metrics_default_is_prometheus_text(client: TestClient) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    body = await response.text()
    assert 'tts_http_requests_total{code="200",method="POST",route="/v1/tts"} 5.0' in body
    assert "process_resident_memory_bytes" in body
    assert "# {" not in body


async def test_metrics_negotiates_openmetrics_with_exemplars(client: TestClient) -> None:
    response = await client.get("/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    body = await response.text()
    assert body.rstrip().endswith("# EOF")
    assert '# {request_id="req-1"} 0.42' in body


@pytest.mark.slow
@pytest.mark.external
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by make test")
async def test_metrics_pass_promtool_check_metrics(client: TestClient) -> None:
    body = await (await client.get("/metrics")).read()
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
async def test_scrapes_of_a_huge_metrics_page_do_not_stall_the_gate(tmp_path: Path) -> None:
    """4 clients scraping a /metrics of 40,000 series: GET /ingress answers faster than one
    render takes (renders run off the event loop, concurrent scrapes share one)."""
    metrics = SidecarMetrics()
    for i in range(40_000):
        metrics.http_requests.inc(("GET", f"/route/{i}", "200"))
    started = time.perf_counter()
    generate_latest(build_registry(metrics))
    render_s = time.perf_counter() - started
    gate_config = GateConfig(gate_file=str(tmp_path / "ingress.json"))
    gate = GateComponent(Gate.from_config(gate_config, stale_after_s=2.0), gate_config,
                         AuthConfig(), metrics)
    await gate.start()
    server = TestServer(build_app(metrics, gate.routes))
    await server.start_server()
    try:
        assert server.port is not None
        latencies = await gate_latencies_while_hammered(server.port, "/metrics", clients=4,
                                                        probes=20)
    finally:
        await server.close()
    assert statistics.median(latencies) < render_s / 4, (statistics.median(latencies), render_s)


async def test_concurrent_callers_share_one_off_loop_job() -> None:
    off_loop = OffLoop()
    calls = []
    release = threading.Event()

    def job() -> int:
        calls.append(1)
        release.wait(5)
        return len(calls)

    try:
        waiting = [asyncio.ensure_future(off_loop.shared("k", job)) for _ in range(4)]
        await asyncio.sleep(0.05)
        release.set()
        assert await asyncio.gather(*waiting) == [1, 1, 1, 1]
        assert await off_loop.shared("k", job) == 2    # finished jobs are not reused
    finally:
        off_loop.close()


async def test_the_worker_rests_as_long_as_its_last_job_ran() -> None:
    now = [100.0]
    rests: list[float] = []

    def sleep(seconds: float) -> None:
        rests.append(seconds)
        now[0] += seconds

    def job(seconds: float) -> Callable[[], float]:
        def run() -> float:
            now[0] += seconds
            return seconds
        return run

    off_loop = OffLoop(clock=lambda: now[0], sleep=sleep)
    try:
        assert await off_loop.run(job(0.3)) == 0.3
        assert await off_loop.run(job(0.1)) == 0.1
        now[0] += 1.0      # idle longer than the last job: no rest
        assert await off_loop.run(job(0.2)) == 0.2
    finally:
        off_loop.close()
    assert rests == [pytest.approx(0.3)]
