"""No false successes over real HTTP: invisible text is 400 TEXT_EMPTY, silent audio is a
counted AUDIO_SILENT warning (not cached), and a stream that fails after its 200 headers is
logged as an aborted request with a failing status."""

from __future__ import annotations

import aiohttp
import pytest

from tests.app.conftest import StartApp
from tests.app.fakes import BreakingBackend, SilentBackend


@pytest.mark.parametrize("text", [
    "\u200f\u200f\u200f",                   # right-to-left marks
    "\u200b \u200b\u200b",                  # zero-width spaces
    "\u200e\ufeff\u2060\u00ad",             # LRM, BOM, word joiner, soft hyphen
    "\u3000\u2028\u2029",                   # ideographic space, line/paragraph separators
    "\u0301\u0308",                         # combining marks with nothing to mark
])
async def test_text_with_nothing_to_speak_is_400_text_empty(start_app: StartApp,
                                                            text: str) -> None:
    app = await start_app()
    response = await app.client.post("/v1/tts", json={"text": text})
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (400, "TEXT_EMPTY"), body
    assert app.records("synthesis_start") == []


async def test_invisible_characters_beside_words_are_still_spoken(start_app: StartApp) -> None:
    app = await start_app()
    response = await app.client.post("/v1/tts", json={"text": "\u200fHello\u200b there."})
    assert response.status == 200
    assert (await response.read())[:4] == b"RIFF"


async def test_silent_audio_is_answered_but_warned_and_not_cached(start_app: StartApp) -> None:
    app = await start_app(backend=SilentBackend())
    for _ in range(2):
        response = await app.client.post("/v1/tts", json={"text": "Say something."})
        assert response.status == 200
        assert response.headers["X-Cache"] == "miss"          # silence is never served twice
    warnings = [r for r in app.records() if r["level"] == "WARNING"]
    assert [w["warning_code"] for w in warnings] == ["AUDIO_SILENT"] * 2
    assert warnings[0]["event"] == "audio_silent"
    assert warnings[0]["threshold"] == 0.001
    completes = app.records("synthesis_complete")
    assert [(r["cache_saved"], r["cache_skip"]) for r in completes] == [(False, "silent")] * 2


async def test_speech_is_not_flagged_silent(start_app: StartApp) -> None:
    app = await start_app()
    assert (await app.client.post("/v1/tts", json={"text": "Loud and clear."})).status == 200
    assert [r for r in app.records() if r["level"] == "WARNING"] == []


async def test_stream_failing_after_headers_logs_an_aborted_request(start_app: StartApp) -> None:
    app = await start_app(backend=BreakingBackend())
    response = await app.client.post("/v1/tts", json={
        "text": "The first sentence is spoken. The second one breaks.", "stream": True},
        headers={"X-Request-ID": "broken-stream"})
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()                              # truncated chunked body
    (line,) = [r for r in app.records("http_request") if r["request_id"] == "broken-stream"]
    assert (line["status"], line["outcome"], line["error_code"], line["status_sent"]) == (
        503, "aborted", "MODEL_ERROR", 200)
    ok = await app.client.post("/v1/tts", json={"text": "Fine.", "stream": True})
    await ok.read()
    assert "outcome" not in app.records("http_request")[-1]
