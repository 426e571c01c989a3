"""Every code in tts_app.errors.ERRORS is reachable over HTTP, with the documented status,
the JSON error body, Retry-After where retrying helps, and the log lines the contract asks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.app import conftest
from tests.app.conftest import Running, StartApp, post_head, raw_http, write_gate
from tests.app.fakes import FailingBackend, GatedBackend
from tts_app.backends.espeak import EspeakBackend
from tts_app.errors import ERRORS

REACHED: set[str] = set()


async def expect_error(response: Any, code: str) -> dict[str, Any]:
    body = await conftest.expect_error(response, code)
    REACHED.add(code)
    return body


@pytest.mark.parametrize(("payload", "code"), [
    ({"text": ""}, "TEXT_EMPTY"),
    ({"text": "   \n"}, "TEXT_EMPTY"),
    ({}, "TEXT_EMPTY"),
    ({"text": "x" * 2001}, "TEXT_TOO_LONG"),
    ({"text": "bell\x07"}, "TEXT_INVALID_CHARS"),
    ({"text": "spoof\u202egnp.exe"}, "TEXT_INVALID_CHARS"),
    ({"text": "lone \ud800 surrogate"}, "TEXT_INVALID_CHARS"),
    ({"text": "hi", "voice": "darth"}, "VOICE_UNKNOWN"),
    ({"text": "hi", "lang": "tlh"}, "LANG_UNSUPPORTED"),
    ({"text": "hi", "format": "mp3"}, "BAD_REQUEST"),
    ({"text": 5}, "BAD_REQUEST"),
    ({"text": "hi", "stream": "yes"}, "BAD_REQUEST"),
    ({"text": "hi", "params": {"temperature": 9}}, "BAD_REQUEST"),
    ({"text": "hi", "surprise": 1}, "BAD_REQUEST"),
])
async def test_validation_errors(start_app: StartApp, payload: dict[str, Any],
                                 code: str) -> None:
    app = await start_app()
    await expect_error(await app.client.post("/v1/tts", json=payload), code)
    # never reached synthesis: only http_request + a WARNING naming the code
    assert app.records("synthesis_start") == []
    warnings = [r for r in app.records() if r["level"] == "WARNING"]
    assert [w["warning_code"] for w in warnings] == [code]
    assert len(app.records("http_request")) == 1


async def test_http_request_line_names_the_error_code_and_no_code_on_success(
        start_app: StartApp) -> None:
    """Issue 19 #2: the sidecar tells shed from failed requests by this field."""
    app = await start_app()
    await expect_error(await app.client.post("/v1/tts", json={"text": ""}), "TEXT_EMPTY")
    assert (await app.client.get("/healthz")).status == 200
    lines = app.records("http_request")
    assert [(r["status"], r.get("error_code")) for r in lines] == [(400, "TEXT_EMPTY"),
                                                                   (200, None)]


async def test_malformed_json_and_oversized_body(start_app: StartApp) -> None:
    app = await start_app()
    await expect_error(await app.client.post("/v1/tts", data=b"{not json"), "BAD_REQUEST")
    await expect_error(await app.client.post("/v1/tts", data=b"[1, 2]"), "BAD_REQUEST")
    await expect_error(await app.client.post("/v1/tts", data=b"x" * 70000), "BODY_TOO_LARGE")


async def test_slow_body_is_408_at_the_body_deadline(start_app: StartApp) -> None:
    app = await start_app({"server": {"body_timeout_s": 0.5}})
    body = b'{"text": "Too slow."}'
    response = await raw_http(app.port, post_head("/v1/tts", len(body)), body[:5],
                              body[5:], pause_s=3)
    assert response is not None
    assert response.status == ERRORS["REQUEST_TIMEOUT"].status
    error = response.json()["error"]
    assert error["code"] == "REQUEST_TIMEOUT"
    assert "0.5 s" in error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert "Retry-After" not in response.headers
    REACHED.add("REQUEST_TIMEOUT")
    assert [r["warning_code"] for r in app.records("request_rejected")] == ["REQUEST_TIMEOUT"]
    assert app.state.active == 0


async def test_unknown_route_and_method(start_app: StartApp) -> None:
    app = await start_app()
    await expect_error(await app.client.get("/v2/nothing"), "NOT_FOUND")
    await expect_error(await app.client.get("/v1/tts"), "METHOD_NOT_ALLOWED")
    await expect_error(await app.client.get("/v1/tts/jobs/nope"), "JOB_NOT_FOUND")


async def test_gpu_oom_and_model_error_are_503_with_code(start_app: StartApp) -> None:
    app = await start_app(backend=FailingBackend())
    await expect_error(await app.client.post("/v1/tts", json={"text": "oom now"}), "GPU_OOM")
    await expect_error(await app.client.post("/v1/tts", json={"text": "model fails"}),
                       "MODEL_ERROR")
    await expect_error(await app.client.post("/v1/tts", json={"text": "bug here"}),
                       "MODEL_ERROR")
    failed = app.records("synthesis_complete")
    assert [(r["status"], r["error_code"], r["model_stage"]) for r in failed] == [
        ("failed", "GPU_OOM", "llm_inference"), ("failed", "MODEL_ERROR", "audio_render"),
        ("failed", "MODEL_ERROR", "none")]
    assert any("ZeroDivisionError" in r.get("traceback", "") for r in app.records())
    # the failure is not cached and the service still works
    ok = await app.client.post("/v1/tts", json={"text": "fine again"})
    assert ok.status == 200


class BrokenVoicesBackend(EspeakBackend):
    """A backend bug outside synthesis (its voice list blows up): the last-resort path."""

    broken = False

    @property
    def voices(self) -> frozenset[str]:
        if self.broken:
            raise RuntimeError("voice registry bug")
        return frozenset(("default",))

    @voices.setter
    def voices(self, _value: frozenset[str]) -> None:
        pass


async def test_unexpected_exception_is_a_json_500(start_app: StartApp) -> None:
    backend = BrokenVoicesBackend()
    app = await start_app(backend=backend)
    backend.broken = True
    await expect_error(await app.client.post("/v1/tts", json={"text": "Hi."}), "INTERNAL")
    errors = [r for r in app.records() if r["event"] == "unhandled_exception"]
    assert "RuntimeError: voice registry bug" in errors[0]["traceback"]
    assert len(app.records("http_request")) == 1


async def test_rate_limit_per_client(start_app: StartApp) -> None:
    app = await start_app({"admission": {"rate_limit": {
        "enabled": True, "rate_per_s": 0.01, "burst": 2}}})
    payload = {"text": "Rate me."}
    for _ in range(2):
        assert (await app.client.post("/v1/tts", json=payload,
                                      headers={"X-Client-ID": "a"})).status == 200
    limited = await app.client.post("/v1/tts", json=payload, headers={"X-Client-ID": "a"})
    await expect_error(limited, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1
    other = await app.client.post("/v1/tts", json=payload, headers={"X-Client-ID": "b"})
    assert other.status == 200


async def test_gate_file_closes_and_reopens_synthesis(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app(backend=backend)
    backend.release.clear()
    in_flight = asyncio.create_task(app.client.post("/v1/tts", json={"text": "In flight."}))
    assert await asyncio.to_thread(backend.entered.acquire, True, 5)
    write_gate(app.gate_file, is_open=False, retry_after_s=7)
    closed = await app.client.post("/v1/tts", json={"text": "Blocked."})
    await expect_error(closed, "INGRESS_CLOSED")
    assert closed.headers["Retry-After"] == "7"
    await expect_error(await app.client.post("/v1/tts/jobs", json={"text": "Blocked."}),
                       "INGRESS_CLOSED")
    assert (await app.client.get("/healthz")).status == 200     # not a synthesis route
    assert (await (await app.client.get("/status")).json())["ingress_open"] is False
    backend.release.set()
    assert (await in_flight).status == 200                     # in-flight work finishes
    write_gate(app.gate_file, is_open=True)
    assert (await app.client.post("/v1/tts", json={"text": "Open again."})).status == 200
    app.gate_file.unlink()                                     # missing file = open
    assert (await app.client.post("/v1/tts", json={"text": "Still open."})).status == 200


async def test_queue_full_under_overload(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app({"admission": {"queue_size": 1, "retry_after_s": 2}},
                          backend=backend)
    backend.release.clear()
    tasks = [asyncio.create_task(app.client.post("/v1/tts", json={"text": f"Request {i}."}))
             for i in range(10)]                      # 10x capacity (1 instance)
    assert await asyncio.to_thread(backend.entered.acquire, True, 5)
    await asyncio.sleep(0.2)
    status = await (await app.client.get("/status")).json()
    assert (status["running"], status["waiting"]) == (1, 1)
    backend.release.set()
    responses = await asyncio.gather(*tasks)
    codes = sorted(r.status for r in responses)
    assert codes == [200, 200] + [429] * 8
    for response in responses:
        if response.status == 429:
            body = await expect_error(response, "QUEUE_FULL")
            assert response.headers["Retry-After"] == "2"
            assert body


async def test_shutting_down_refuses_new_work_and_finishes_in_flight(
        start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app(backend=backend)
    backend.release.clear()
    in_flight = asyncio.create_task(app.client.post("/v1/tts", json={"text": "Finish me."}))
    assert await asyncio.to_thread(backend.entered.acquire, True, 5)
    drain = asyncio.create_task(app.state.drain())
    await asyncio.sleep(0.05)
    assert (await app.client.get("/readyz")).status == 503
    await expect_error(await app.client.post("/v1/tts", json={"text": "New."}),
                       "SHUTTING_DOWN")
    assert not drain.done()
    backend.release.set()
    assert (await in_flight).status == 200
    await asyncio.wait_for(drain, 5)


async def test_model_not_ready(start_app: StartApp) -> None:
    backend = GatedBackend()
    backend.load_gate.clear()
    app: Running = await start_app(backend=backend, wait_ready=False)
    await expect_error(await app.client.post("/v1/tts", json={"text": "Early."}),
                       "MODEL_NOT_READY")
    backend.load_gate.set()
    await app.state.settled.wait()


async def test_idempotency_conflict(start_app: StartApp) -> None:
    app = await start_app()
    headers = {"Idempotency-Key": "k1"}
    assert (await app.client.post("/v1/tts/jobs", json={"text": "One."},
                                  headers=headers)).status == 202
    await expect_error(await app.client.post("/v1/tts/jobs", json={"text": "Two."},
                                             headers=headers), "IDEMPOTENCY_CONFLICT")


def test_every_error_code_was_reached() -> None:
    """Runs last in this module: each code of the table was produced by a test above."""
    if not REACHED:
        pytest.skip("meaningful only after the whole module ran")
    assert set(ERRORS) - REACHED == set()


async def test_requests_sharing_a_failed_synthesis_all_get_the_code(start_app: StartApp) -> None:
    backend = FailingBackend()
    app = await start_app(backend=backend)
    backend.release.clear()
    payload = {"text": "oom for everyone", "stream": False}
    tasks = [asyncio.create_task(app.client.post("/v1/tts", json=payload)) for _ in range(3)]
    tasks.append(asyncio.create_task(app.client.post("/v1/tts", json={**payload,
                                                                       "stream": True})))
    assert await asyncio.to_thread(backend.entered.acquire, True, 5)
    await asyncio.sleep(0.1)
    backend.release.set()
    for response in await asyncio.gather(*tasks):
        await expect_error(response, "GPU_OOM")
    assert backend.calls == 1
    starts, completes = app.records("synthesis_start"), app.records("synthesis_complete")
    assert len(starts) == len(completes) == 4
    assert {r["request_id"] for r in starts} == {r["request_id"] for r in completes}
    assert all(r["status"] == "failed" and r["error_code"] == "GPU_OOM" for r in completes)
