"""A burst far beyond capacity is answered with 200/429/503 only, never a 500 or a hang."""

from __future__ import annotations

import asyncio

from tests.app.conftest import StartApp, write_gate
from tts_app.backends.espeak import EspeakBackend


async def test_burst_of_distinct_texts_with_gate_flip(start_app: StartApp) -> None:
    app = await start_app({"admission": {"queue_size": 2}}, backend=EspeakBackend(instances=2))
    text = " ".join(f"Clause {i} of a reasonably long sentence." for i in range(12))

    async def one(i: int) -> tuple[int, str | None]:
        response = await app.client.post("/v1/tts", json={"text": f"{i}: {text}"})
        await response.read()
        return response.status, response.headers.get("Retry-After")

    first = asyncio.gather(*(one(i) for i in range(20)))          # 10x capacity of 2
    results = await first
    write_gate(app.gate_file, is_open=False, retry_after_s=5)
    results += await asyncio.gather(*(one(i) for i in range(20, 25)))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429, 503}
    assert statuses.count(429) > 0 and statuses[-5:] == [503] * 5
    assert all(retry for status, retry in results if status != 200)
    assert len(app.records("http_request")) == 25
    assert len(app.records("synthesis_complete")) == statuses.count(200)
    status = await (await app.client.get("/status")).json()
    assert (status["running"], status["waiting"]) == (0, 0)
