"""Async jobs: 202 + id, polling, audio when done, Idempotency-Key replay and conflict, keys
checked and scoped per client identity."""

from __future__ import annotations

import asyncio

import pytest

from tests.app.conftest import StartApp, post_head, raw_http
from tests.app.fakes import FailingBackend, GatedBackend

BODY = b'{"text": "Keyed."}'


async def poll_done(client, job_id: str) -> dict:
    for _ in range(200):
        response = await client.get(f"/v1/tts/jobs/{job_id}",
                                    headers={"Accept": "application/json"})
        body = await response.json()
        if body["status"] in ("done", "failed"):
            return body
        await asyncio.sleep(0.01)
    raise AssertionError("job never finished")


async def test_job_runs_and_serves_audio(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app(backend=backend)
    backend.release.clear()
    response = await app.client.post("/v1/tts/jobs", json={"text": "A job to do."})
    assert response.status == 202
    job = await response.json()
    assert response.headers["Location"] == f"/v1/tts/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    pending = await app.client.get(f"/v1/tts/jobs/{job['id']}")
    assert pending.headers["X-Job-Status"] in ("queued", "running")
    backend.release.set()
    assert (await poll_done(app.client, job["id"]))["status"] == "done"
    audio = await app.client.get(f"/v1/tts/jobs/{job['id']}")
    assert audio.headers["Content-Type"] == "audio/wav"
    assert (await audio.read())[:4] == b"RIFF"


async def test_same_idempotency_key_and_body_returns_same_job(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app(backend=backend)
    headers = {"Idempotency-Key": "retry-1"}
    payload = {"text": "Charge me once.", "voice": "en-us"}
    first = await (await app.client.post("/v1/tts/jobs", json=payload, headers=headers)).json()
    replay = await app.client.post("/v1/tts/jobs", json=dict(reversed(payload.items())),
                                   headers=headers)
    assert replay.status == 202
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert (await replay.json())["id"] == first["id"]
    other = await app.client.post("/v1/tts/jobs", json=payload,
                                  headers={"Idempotency-Key": "retry-2"})
    assert (await other.json())["id"] != first["id"]
    conflict = await app.client.post("/v1/tts/jobs", json={"text": "Something else."},
                                     headers=headers)
    assert conflict.status == 409
    await poll_done(app.client, first["id"])
    assert backend.calls == 1     # the second key's job shared the first job's synthesis/cache


async def test_failed_job_reports_error_code(start_app: StartApp) -> None:
    app = await start_app(backend=FailingBackend())
    job = await (await app.client.post("/v1/tts/jobs", json={"text": "oom please"})).json()
    done = await poll_done(app.client, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "GPU_OOM"


async def test_too_many_pending_jobs_is_429(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app({"jobs": {"max_pending": 2}}, backend=backend)
    backend.release.clear()
    for i in range(2):
        ok = await app.client.post("/v1/tts/jobs", json={"text": f"Job {i}."})
        assert ok.status == 202
    full = await app.client.post("/v1/tts/jobs", json={"text": "One too many."})
    assert full.status == 429
    assert "Retry-After" in full.headers
    assert (await full.json())["error"]["code"] == "QUEUE_FULL"
    backend.release.set()


async def test_finished_jobs_are_bounded_by_audio_bytes(start_app: StartApp) -> None:
    app = await start_app({"jobs": {"max_bytes": 1}})
    first = await (await app.client.post("/v1/tts/jobs", json={"text": "Old job."})).json()
    await poll_done(app.client, first["id"])
    second = await (await app.client.post("/v1/tts/jobs", json={"text": "New job."})).json()
    assert (await poll_done(app.client, second["id"]))["status"] == "done"
    gone = await app.client.get(f"/v1/tts/jobs/{first['id']}")
    assert gone.status == 404
    assert (await gone.json())["error"]["code"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", "caf\u00e9"])
async def test_empty_overlong_or_unprintable_idempotency_key_is_400(start_app: StartApp,
                                                                    key: str) -> None:
    app = await start_app()
    head = post_head("/v1/tts/jobs", len(BODY), f"Idempotency-Key: {key}\r\n")
    response = await raw_http(app.port, head + BODY)
    assert response is not None
    assert response.status == 400, response
    error = response.json()["error"]
    assert error["code"] == "BAD_REQUEST"
    assert "Idempotency-Key" in error["message"]
    assert app.state.jobs.jobs == {}
    longest = await app.client.post("/v1/tts/jobs", data=BODY,
                                    headers={"Idempotency-Key": "k" * 255})
    assert longest.status == 202


async def test_idempotency_keys_are_scoped_per_client(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app(backend=backend)
    backend.release.clear()

    async def submit(client: str, text: str = "Mine.") -> tuple[int, dict, bool]:
        response = await app.client.post("/v1/tts/jobs", json={"text": text}, headers={
            "Idempotency-Key": "order-1", "X-Forwarded-For": client})
        return (response.status, await response.json(),
                "Idempotent-Replayed" in response.headers)

    status_a, job_a, _ = await submit("198.51.100.1")
    status_b, job_b, replayed_b = await submit("198.51.100.2")
    assert (status_a, status_b, replayed_b) == (202, 202, False)
    assert job_b["id"] != job_a["id"]              # another client's key is another job
    status_c, job_c, _ = await submit("198.51.100.3", "Something else.")
    assert status_c == 202
    assert job_c["id"] not in (job_a["id"], job_b["id"])   # not a 409
    status_a2, job_a2, replayed_a2 = await submit("198.51.100.1")
    assert (status_a2, job_a2["id"], replayed_a2) == (202, job_a["id"], True)
    assert (await submit("198.51.100.1", "Changed my mind."))[0] == 409
    backend.release.set()
