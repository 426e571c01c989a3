"""The HTTP surface over a real socket: landing page, health, exposition formats."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from aiohttp.test_utils import TestClient

from exporter.metrics import SidecarMetrics
from exporter.server import build_app


@pytest.fixture
async def client(aiohttp_client) -> TestClient:  # type: ignore[no-untyped-def]
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


@pytest.mark.external
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by make test")
async def test_metrics_pass_promtool_check_metrics(client: TestClient) -> None:
    body = await (await client.get("/metrics")).read()
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
