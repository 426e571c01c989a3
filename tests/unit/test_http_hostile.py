"""Hostile headers and bodies on every route of the sidecar, over a real socket: each gets a clear
4xx (or its normal answer), never a 500, and nothing changes state."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from exporter.config import AuthConfig, Config, GateConfig, ServerConfig
from exporter.gate import Gate, GateComponent
from exporter.logs.timelines import TimelineComponent
from exporter.metrics import SidecarMetrics
from exporter.server import build_app
from tests.unit.conftest import http_request, raw_request

TOKEN = b"t0ken"
BEARER = {"Authorization": b"Bearer " + TOKEN}
MAX_BODY = 65536


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[tuple[int, GateComponent]]:
    """Every route the sidecar serves (gate, timelines, exposition) on a real port."""
    metrics = SidecarMetrics()
    gate_config = GateConfig(gate_file=str(tmp_path / "ingress.json"))
    gate = GateComponent(Gate.from_config(gate_config, stale_after_s=2.0), gate_config,
                         AuthConfig(bearer_token=TOKEN.decode()), metrics)
    await gate.start()
    timelines = TimelineComponent.from_config(Config())
    app = build_app(metrics, [*gate.routes, *timelines.routes],
                    config=ServerConfig(max_body_bytes=MAX_BODY))
    server = TestServer(app)
    await server.start_server()
    try:
        assert server.port is not None
        yield server.port, gate
    finally:
        await server.close()


async def test_non_ascii_bearer_token_is_401_not_500(
        sidecar: tuple[int, GateComponent]) -> None:
    port, gate = sidecar
    status, _ = await raw_request(port, http_request(
        "POST", "/ingress", {"Authorization": b"Bearer \xff\xfe"},
        b'{"action": "close", "reason": "x"}'))
    assert status == 401
    assert gate.gate.state.open


async def test_deeply_nested_body_with_a_valid_token_is_4xx_not_500(
        sidecar: tuple[int, GateComponent]) -> None:
    port, gate = sidecar
    status, _ = await raw_request(port, http_request("POST", "/ingress", BEARER,
                                                     b"[" * 100_000))
    assert status == 413   # past server.max_body_bytes before it is parsed
    status, body = await raw_request(port, http_request("POST", "/ingress", BEARER,
                                                        b"[" * (MAX_BODY - 1)))
    assert status == 400
    assert b"nested too deeply" in body
    assert gate.gate.state.open


HOSTILE_BODIES = [
    b"\xff\xfe\x00{",                                  # invalid UTF-8
    b'{"action": "close", "reason": "\xed\xa0\x80"}',  # a UTF-8 encoded surrogate
    b'{"action": "close", "reason": NaN}',
    b'{"action": "close", "reason": Infinity}',
    b'{"version": "4", "alerts": [{"status": "firing", "labels": -Infinity}]}',
    b"[]", b"null", b'"close"', b"1e400", b"{}", b"",
    b'{"action": ["close"], "reason": "x"}',
    b'{"action": "close", "reason": {"a": 1}}',
    b'{"action": "close", "reason": "   "}',
    b'{"version": 4, "alerts": []}',
    b'{"version": "4", "alerts": {"a": 1}}',
    b'{"version": "4", "alerts": [1, "x", null]}',
    b'{"version": "4", "alerts": [{"status": "firing", "labels": {"alertname": ["A"]}}]}',
    b'{"version": "4", "alerts": [{"status": ["firing"], "labels": {"alertname": "A"}}]}',
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b"{" + b'"k": 1, ' * 8000 + b'"z": 1}',        # past the body bound
]


@pytest.mark.parametrize("route", ["/ingress", "/alertmanager"])
@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=lambda b: repr(b[:24]))
async def test_hostile_bodies_on_post_routes_are_4xx_and_change_nothing(
        sidecar: tuple[int, GateComponent], route: str, body: bytes) -> None:
    port, gate = sidecar
    before = gate.gate_file.read_bytes()
    status, answer = await raw_request(port, http_request("POST", route, BEARER, body))
    assert status in (400, 413), answer
    assert gate.gate.state.open
    assert gate.gate_file.read_bytes() == before


HOSTILE_HEADERS = [
    {"Authorization": b"Bearer \xff\xfe"},
    {"Authorization": b"Basic \x80\x81=="},
    {"Authorization": b"Bearer " + b"x" * 8000},
    {"Accept": b"\xff\xfe application/openmetrics-text"},
    {"Accept": b"application/openmetrics-text; version=\xff; q=NaN"},
    {"X-Forwarded-For": b"\xc3\x28, ::1, 999.1.1.1"},
    {"Content-Type": b"application/json; charset=\xff"},
    {"X-Huge": b"x" * 20_000},                         # past aiohttp's header field bound
    {f"X-Many-{i}": b"1" for i in range(200)},         # past its header count bound
]
ROUTES = [("GET", "/"), ("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/ingress"),
          ("GET", "/requests"), ("GET", "/requests/%FF%FE"), ("GET", "/requests/" + "r" * 20_000),
          ("POST", "/ingress"), ("POST", "/alertmanager")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("headers", HOSTILE_HEADERS, ids=lambda h: repr(h)[:30])
async def test_hostile_headers_on_every_route_never_get_a_500(
        sidecar: tuple[int, GateComponent], method: str, path: str,
        headers: dict[str, bytes]) -> None:
    port, gate = sidecar
    body = b'{"action": "close", "reason": "x"}' if method == "POST" else b""
    status, answer = await raw_request(port, http_request(method, path, headers, body))
    assert status < 500, answer
    assert gate.gate.state.open


CAP = Config().timelines.max_list_limit


@pytest.mark.parametrize(("limit", "status", "applied"), [
    ("1000000000", 200, CAP), ("9" * 5000, 200, CAP), ("0001", 200, 1), ("20", 200, 20),
    ("-1", 400, None), ("0", 400, None), ("1.5", 400, None), ("1e3", 400, None),
    ("", 400, None), ("abc", 400, None),
    ("%D9%A1%D9%A2", 400, None),   # Arabic-Indic digits: int() would accept them
    ("%00", 400, None), ("%FF", 400, None),
])
async def test_requests_limit_is_validated_and_capped(
        sidecar: tuple[int, GateComponent], limit: str, status: int,
        applied: int | None) -> None:
    port, _ = sidecar
    got, body = await raw_request(port, http_request("GET", f"/requests?limit={limit}"))
    assert got == status, body
    if applied is not None:
        assert json.loads(body)["limit"] == applied


async def test_a_body_slower_than_the_read_timeout_gets_408(tmp_path: Path) -> None:
    metrics = SidecarMetrics()
    gate_config = GateConfig(gate_file=str(tmp_path / "ingress.json"))
    gate = GateComponent(Gate.from_config(gate_config, stale_after_s=2.0), gate_config,
                         AuthConfig(bearer_token=TOKEN.decode()), metrics)
    await gate.start()
    server = TestServer(build_app(metrics, gate.routes,
                                  config=ServerConfig(read_body_timeout_s=0.5)))
    await server.start_server()
    try:
        assert server.port is not None
        head = http_request("POST", "/ingress", BEARER).replace(b"Content-Length: 0",
                                                                  b"Content-Length: 100")
        status, _ = await raw_request(server.port, head + b'{"action": ')
        assert status == 408
        assert gate.gate.state.open
    finally:
        await server.close()
