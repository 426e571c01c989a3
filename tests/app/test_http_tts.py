"""POST /v1/tts end to end over real HTTP with real espeak speech."""

from __future__ import annotations

import asyncio
import io
import wave

import numpy as np

from tests.app.conftest import StartApp
from tests.app.fakes import GatedBackend, PausingBackend

SPEECH_RMS_FLOOR = 0.02   # espeak speech sits near 0.08-0.12; silence or clicks are far below


def decode_wav(body: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(body)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        frames = wav.readframes(wav.getnframes())
        return wav.getframerate(), np.frombuffer(frames, "<i2").astype(np.float32) / 32768


async def test_english_request_returns_real_speech_wav(start_app: StartApp) -> None:
    app = await start_app()
    response = await app.client.post("/v1/tts", json={"text": "Hello, this is a speech test.",
                                                      "voice": "en-us", "lang": "en"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "audio/wav"
    body = await response.read()
    assert body[:4] == b"RIFF"
    assert body[8:12] == b"WAVE"
    rate, samples = decode_wav(body)
    assert rate == 22050
    assert samples.size > rate * 0.5                  # more than half a second of audio
    assert float(np.sqrt(np.mean(samples ** 2))) > SPEECH_RMS_FLOOR


async def test_mandarin_request_returns_speech(start_app: StartApp) -> None:
    app = await start_app()
    response = await app.client.post("/v1/tts", json={"text": "今天天气真好。", "lang": "zh"})
    assert response.status == 200
    rate, samples = decode_wav(await response.read())
    assert rate == 22050
    assert float(np.sqrt(np.mean(samples ** 2))) > SPEECH_RMS_FLOOR


async def test_pcm_format_is_raw_samples(start_app: StartApp) -> None:
    app = await start_app()
    wav = await (await app.client.post("/v1/tts", json={"text": "Raw samples."})).read()
    response = await app.client.post("/v1/tts", json={"text": "Raw samples.", "format": "pcm"})
    assert response.headers["Content-Type"].startswith("audio/L16; rate=22050")
    pcm = await response.read()
    # espeak adds noise to unvoiced sounds, so two runs differ slightly: compare shape
    assert pcm[:4] != b"RIFF"
    assert abs(len(pcm) - len(wav[44:])) < 0.05 * len(pcm)


async def test_stream_sends_header_then_chunks_and_logs_first_audio(start_app: StartApp) -> None:
    app = await start_app()
    text = "First sentence here. Second sentence follows. And a third one ends it."
    response = await app.client.post("/v1/tts", json={"text": text, "stream": True})
    assert response.status == 200
    assert response.headers.get("Transfer-Encoding") == "chunked"
    pieces = [chunk async for chunk, _ in response.content.iter_chunks()]
    body = b"".join(pieces)
    assert body[:4] == b"RIFF"
    assert body[36:40] == b"data"
    samples = np.frombuffer(body[44:], "<i2").astype(np.float32) / 32768
    assert float(np.sqrt(np.mean(samples ** 2))) > SPEECH_RMS_FLOOR
    request_id = response.headers["X-Request-ID"]
    first = [r for r in app.records("first_audio") if r["request_id"] == request_id]
    assert len(first) == 1
    assert first[0]["duration_ms"] >= 0
    # the same text buffered equals the streamed samples
    plain = await (await app.client.post("/v1/tts", json={"text": text})).read()
    assert plain[44:] == body[44:]


async def test_repeat_is_a_cache_hit(start_app: StartApp) -> None:
    app = await start_app()
    payload = {"text": "Cache me if you can."}
    first = await app.client.post("/v1/tts", json=payload)
    second = await app.client.post("/v1/tts", json=payload)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
    assert await first.read() == await second.read()
    completes = app.records("synthesis_complete")
    assert [r["cache_hit"] for r in completes] == [False, True]
    assert completes[0]["cache_saved"] is True


async def test_cache_survives_restart_on_disk(start_app: StartApp) -> None:
    first = await start_app()
    await first.client.post("/v1/tts", json={"text": "Persist me."})
    second = await start_app()         # same cache dir, fresh process state
    response = await second.client.post("/v1/tts", json={"text": "Persist me."})
    assert response.headers["X-Cache"] == "hit"


async def test_identical_concurrent_requests_share_one_synthesis(start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app(backend=backend)
    backend.release.clear()
    payload = {"text": "Everyone asks for this sentence at once."}
    tasks = [asyncio.create_task(app.client.post("/v1/tts", json=payload)) for _ in range(8)]
    assert await asyncio.to_thread(backend.entered.acquire, True, 5)
    await asyncio.sleep(0.1)           # let the other seven arrive and join the flight
    backend.release.set()
    responses = await asyncio.gather(*tasks)
    bodies = {await r.read() for r in responses}
    assert [r.status for r in responses] == [200] * 8
    assert len(bodies) == 1
    assert backend.calls == 1
    completes = app.records("synthesis_complete")
    assert len(completes) == 8
    assert sum(not r["cache_hit"] for r in completes) == 1


async def test_request_id_is_echoed_and_generated(start_app: StartApp) -> None:
    app = await start_app()
    given = await app.client.post("/v1/tts", json={"text": "Trace me."},
                                  headers={"X-Request-ID": "req-42"})
    assert given.headers["X-Request-ID"] == "req-42"
    generated = await app.client.get("/healthz")
    assert len(generated.headers["X-Request-ID"]) == 32
    events = {r["event"] for r in app.records() if r["request_id"] == "req-42"}
    assert {"synthesis_start", "stage_time", "audio_metrics", "synthesis_complete",
            "http_request"} <= events


async def test_status_healthz_readyz(start_app: StartApp) -> None:
    app = await start_app()
    assert (await app.client.get("/healthz")).status == 200
    assert (await app.client.get("/readyz")).status == 200
    status = await (await app.client.get("/status")).json()
    assert {"waiting", "running", "capacity", "started_at", "pid", "backend", "model_version",
            "ready"} <= set(status)
    assert status["backend"] == "espeak"
    assert status["ready"] is True
    assert status["capacity"] == 1
    assert status["model_version"].startswith("espeak-ng-")


async def test_readyz_waits_for_model_load_and_warmup(start_app: StartApp) -> None:
    backend = GatedBackend()
    backend.load_gate.clear()
    app = await start_app(backend=backend, wait_ready=False)
    assert (await app.client.get("/readyz")).status == 503
    assert (await app.client.get("/healthz")).status == 200
    response = await app.client.post("/v1/tts", json={"text": "Too early."})
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "MODEL_NOT_READY"
    assert "Retry-After" in response.headers
    backend.load_gate.set()
    await app.state.settled.wait()
    assert (await app.client.get("/readyz")).status == 200


async def test_spacing_variants_share_a_cache_entry(start_app: StartApp) -> None:
    app = await start_app()
    await app.client.post("/v1/tts", json={"text": "Same  words,\nother spacing. "})
    again = await app.client.post("/v1/tts", json={"text": " Same words, other spacing."})
    assert again.headers["X-Cache"] == "hit"


async def test_han_text_without_lang_is_spoken_as_mandarin(start_app: StartApp) -> None:
    app = await start_app()
    await app.client.post("/v1/tts", json={"text": "今天天气真好。"})
    await app.client.post("/v1/tts", json={"text": "Plain English."})
    assert [r["lang"] for r in app.records("synthesis_start")] == ["zh", "en"]


async def test_stream_delivers_first_chunk_before_synthesis_ends(start_app: StartApp) -> None:
    backend = PausingBackend()
    app = await start_app(backend=backend)
    response = await app.client.post("/v1/tts", json={
        "text": "The first sentence arrives early. The second waits.", "stream": True})
    assert response.status == 200                       # headers sent with the first chunk
    early = await asyncio.wait_for(response.content.readexactly(44 + 2000), 5)
    assert early[:4] == b"RIFF"
    assert app.records("synthesis_complete") == []      # the synthesis is still running
    backend.resume.set()
    rest = await response.read()
    assert len(rest) > 10000
    assert app.records("synthesis_complete")[0]["status"] == "success"


async def test_queue_ms_is_the_wait_for_a_model_instance(start_app: StartApp) -> None:
    backend = GatedBackend()          # one instance
    app = await start_app(backend=backend)
    backend.release.clear()
    first = asyncio.create_task(app.client.post("/v1/tts", json={"text": "First in line."},
                                                headers={"X-Request-ID": "first"}))
    assert await asyncio.to_thread(backend.entered.acquire, True, 5)
    second = asyncio.create_task(app.client.post("/v1/tts", json={"text": "Second in line."},
                                                 headers={"X-Request-ID": "second"}))
    await asyncio.sleep(0.4)          # the second waits for the only instance meanwhile
    backend.release.set()
    assert [r.status for r in await asyncio.gather(first, second)] == [200, 200]
    completes = {r["request_id"]: r for r in app.records("synthesis_complete")}
    assert completes["second"]["queue_ms"] >= 300
    assert completes["first"]["queue_ms"] < completes["second"]["queue_ms"]
    # synthesis time no longer hides queueing: the second's duration excludes its wait
    assert completes["second"]["duration_ms"] < completes["second"]["queue_ms"]
    version = app.state.backend.model_version
    assert {r["model_version"] for r in completes.values()} == {version}
    hit = await app.client.post("/v1/tts", json={"text": "First in line."})
    assert hit.headers["X-Cache"] == "hit"
    last = app.records("synthesis_complete")[-1]
    assert "queue_ms" not in last
    assert last["model_version"] == version   # never queued


async def test_text_log_carries_queue_ms_and_model_version(start_app: StartApp) -> None:
    app = await start_app({"log": {"format": "text"}})
    await app.client.post("/v1/tts", json={"text": "Text line."})
    (line,) = [x for x in app.log_path.read_text().splitlines() if " - synthesis_complete: " in x]
    assert ", queue_ms=" in line
    assert f", model_version={app.state.backend.model_version}" in line
