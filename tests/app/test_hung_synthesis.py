"""A synthesis that never returns (a wedged model) over real HTTP: the client gets 503 at
``backend.timeout_s``, the instance it holds leaves service and is replaced, /status stays
honest meanwhile, and with no instance left the process reports not-live."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.app.conftest import Running, StartApp
from tests.app.fakes import GatedBackend, HangingBackend

TIMEOUT_S = 0.5


@pytest.fixture
async def hanging() -> AsyncIterator[HangingBackend]:
    backend = HangingBackend()
    yield backend
    backend.release_all()      # never leave a blocked thread behind a failed test


async def status_when(app: Running, condition: Callable[[dict[str, Any]], bool],
                      timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll /status until ``condition`` holds (generous deadline: CI has 2 cores)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = await (await app.client.get("/status")).json()
        if condition(status) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.02)


async def start(start_app: StartApp, backend: HangingBackend, **backend_config: Any) -> Running:
    return await start_app({"backend": {"timeout_s": TIMEOUT_S, **backend_config}},
                           backend=backend)


async def test_hung_synthesis_gets_503_and_its_instance_is_replaced(
        start_app: StartApp, hanging: HangingBackend) -> None:
    app = await start(start_app, hanging)
    hanging.rebuild_gate.clear()
    began = time.monotonic()
    hung = await app.client.post("/v1/tts", json={"text": "Hang forever."})
    assert hung.status == 503
    assert (await hung.json())["error"]["code"] == "MODEL_ERROR"
    assert time.monotonic() - began < TIMEOUT_S + 5
    # The next request waits for an instance while the replacement loads: waiting, not running.
    after = asyncio.create_task(app.client.post("/v1/tts", json={"text": "After the hang."}))
    status = await status_when(app, lambda s: s["waiting"] == 1)
    assert (status["waiting"], status["running"]) == (1, 0), status
    assert (status["instances_total"], status["instances_healthy"],
            status["instances_hung"]) == (1, 0, 1), status
    assert (await app.client.get("/healthz")).status == 200     # a replacement is loading
    hanging.rebuild_gate.set()
    response = await asyncio.wait_for(after, 10)
    assert response.status == 200
    assert (await response.read())[:4] == b"RIFF"
    assert hanging.rebuilds == 1
    status = await (await app.client.get("/status")).json()
    assert (status["running"], status["waiting"], status["instances_healthy"],
            status["instances_hung"]) == (0, 0, 1, 1), status
    # The wedged call finally returns: its instance is discarded, not put back beside the new one.
    hanging.unhang.set()
    status = await status_when(app, lambda s: s["instances_hung"] == 0)
    assert (status["instances_healthy"], status["instances_hung"]) == (1, 0), status
    assert (await app.client.post("/v1/tts", json={"text": "Still fine."})).status == 200
    events = [r["event"] for r in app.records() if r["event"].startswith("instance_")]
    assert events == ["instance_hung", "instance_rebuilt", "instance_hung_returned"]
    hung_record = app.records("instance_hung")[0]
    assert (hung_record["level"], hung_record["error_code"], hung_record["retired"]) == (
        "ERROR", "MODEL_HUNG", True)


async def test_no_instance_left_fails_liveness_until_one_is_back(
        start_app: StartApp, hanging: HangingBackend) -> None:
    app = await start(start_app, hanging, max_hung_instances=0)    # never load a replacement
    hung = await app.client.post("/v1/tts", json={"text": "Hang here."})
    assert (await hung.json())["error"]["code"] == "MODEL_ERROR"
    healthz = await app.client.get("/healthz")
    assert healthz.status == 503
    assert (await healthz.json())["reason"] == "no_model_instance"
    readyz = await app.client.get("/readyz")
    assert readyz.status == 503
    assert (await readyz.json())["reason"] == "no_model_instance"
    refused = await app.client.post("/v1/tts", json={"text": "Anyone there?"})
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "MODEL_NOT_READY"
    status = await (await app.client.get("/status")).json()
    assert (status["instances_healthy"], status["running"], status["waiting"]) == (0, 0, 0)
    assert hanging.rebuilds == 0
    hanging.unhang.set()             # the hung call returns: a replacement may load now
    status = await status_when(app, lambda s: s["instances_healthy"] == 1)
    assert status["instances_healthy"] == 1
    assert hanging.rebuilds == 1
    assert (await app.client.get("/healthz")).status == 200
    assert (await app.client.post("/v1/tts", json={"text": "Anyone there?"})).status == 200


async def test_call_hung_before_taking_an_instance_holds_its_slot_until_it_returns(
        start_app: StartApp) -> None:
    backend = GatedBackend()       # blocks before its instance is checked out: none to retire
    app = await start_app({"backend": {"timeout_s": TIMEOUT_S}}, backend=backend)
    backend.release.clear()
    try:
        hung = await app.client.post("/v1/tts", json={"text": "Stuck at the door."})
        assert (await hung.json())["error"]["code"] == "MODEL_ERROR"
        status = await (await app.client.get("/status")).json()
        assert (status["running"], status["instances_healthy"], status["instances_hung"]) == (
            0, 0, 1), status
        assert app.records("instance_hung")[0]["retired"] is False
        assert (await app.client.get("/healthz")).status == 200   # the call may come back
    finally:
        backend.release.set()
    status = await status_when(app, lambda s: s["instances_hung"] == 0)
    assert status["instances_healthy"] == 1, status
    assert (await app.client.post("/v1/tts", json={"text": "Through now."})).status == 200
