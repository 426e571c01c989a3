"""Async jobs: 202 + id, polling, audio when done, Idempotency-Key replay and conflict."""

from __future__ import annotations

import asyncio

from tests.app.conftest import StartApp
from tests.app.fakes import FailingBackend, GatedBackend


async def poll_done(client, job_id: str) -> dict:   # type: ignore[no-untyped-def]
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
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
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
    assert done["status"] == "failed" and done["error"]["code"] == "GPU_OOM"


async def test_too_many_pending_jobs_is_429(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app({"jobs": {"max_pending": 2}}, backend=backend)
    backend.release.clear()
    for i in range(2):
        ok = await app.client.post("/v1/tts/jobs", json={"text": f"Job {i}."})
        assert ok.status == 202
    full = await app.client.post("/v1/tts/jobs", json={"text": "One too many."})
    assert full.status == 429 and "Retry-After" in full.headers
    assert (await full.json())["error"]["code"] == "QUEUE_FULL"
    backend.release.set()


async def test_finished_jobs_are_bounded_by_audio_bytes(start_app: StartApp) -> None:
    app = await start_app({"jobs": {"max_bytes": 1}})
    first = await (await app.client.post("/v1/tts/jobs", json={"text": "Old job."})).json()
    await poll_done(app.client, first["id"])
    second = await (await app.client.post("/v1/tts/jobs", json={"text": "New job."})).json()
    assert (await poll_done(app.client, second["id"]))["status"] == "done"
    gone = await app.client.get(f"/v1/tts/jobs/{first['id']}")
    assert gone.status == 404 and (await gone.json())["error"]["code"] == "JOB_NOT_FOUND"
