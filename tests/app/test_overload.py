"""A burst far beyond capacity, or a load while the log disk is full, is answered with
200/429/503 only, never a 500, a hang or a leaked slot."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import resource
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.app.conftest import AppProcess, StartApp, write_gate
from tests.app.fakes import GatedBackend
from tests.support.local_stack import wait_until
from tts_app.backends.espeak import EspeakBackend
from tts_app.errors import ERRORS, AppError
from tts_app.server import error_response


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
    assert statuses.count(429) > 0
    assert statuses[-5:] == [503] * 5
    assert all(retry for status, retry in results if status != 200)
    assert len(app.records("http_request")) == 25
    assert len(app.records("synthesis_complete")) == statuses.count(200)
    status = await (await app.client.get("/status")).json()
    assert (status["running"], status["waiting"]) == (0, 0)



async def test_full_queue_sheds_late_and_cheaply_but_serves_hits_and_joins(
        start_app: StartApp) -> None:
    backend = GatedBackend()
    app = await start_app({"admission": {"queue_size": 1, "shed_delay_s": 0.3}},
                          backend=backend)
    assert (await app.client.post("/v1/tts", json={"text": "Cached already."})).status == 200
    backend.release.clear()
    running = asyncio.ensure_future(app.client.post("/v1/tts", json={"text": "Running."}))
    await asyncio.get_running_loop().run_in_executor(None, backend.entered.acquire)
    waiting = asyncio.ensure_future(app.client.post("/v1/tts", json={"text": "Waiting."}))
    while app.state.admission.waiting == 0:
        await asyncio.sleep(0.01)
    status = await (await app.client.get("/status")).json()
    assert (status["queue_size"], status["queue_limit"], status["running"],
            status["waiting"]) == (1, 2, 1, 1)

    started = time.monotonic()
    shed = await app.client.post("/v1/tts", json={"text": "Refused."},
                                 headers={"X-Request-ID": 'odd "id" \\ here'})
    assert time.monotonic() - started >= 0.3            # held, holding no slot
    assert (shed.status, shed.headers["Retry-After"]) == (429, "1")
    assert shed.headers["Content-Type"] == "application/json; charset=utf-8"
    assert await shed.json() == {"error": {
        "code": "QUEUE_FULL", "message": "synthesis queue is full; retry later",
        "request_id": 'odd "id" \\ here'}}
    hit = await app.client.post("/v1/tts", json={"text": "Cached already."})
    join = asyncio.ensure_future(app.client.post("/v1/tts", json={"text": "Running."},
                                                 headers={"X-Request-ID": "join"}))
    assert (hit.status, hit.headers["X-Cache"]) == (200, "hit")
    while not any(r["request_id"] == "join" for r in app.records("synthesis_start")):
        await asyncio.sleep(0.01)
    backend.release.set()
    for response in await asyncio.gather(running, waiting, join):
        assert response.status == 200
    assert (await join).headers["X-Cache"] == "shared"
    rejected = [r for r in app.records("http_request") if r["status"] == 429]
    assert [r["request_id"] for r in rejected] == ['odd "id" \\ here']



@pytest.mark.parametrize("code", sorted(ERRORS))
def test_a_prebuilt_error_body_is_the_encoded_one(code: str) -> None:
    request_id = 'r"1\\é'
    body = error_response(AppError(code), request_id, 1).body
    assert isinstance(body, bytes)
    assert json.loads(body) == {"error": {"code": code, "message": ERRORS[code].message,
                                          "request_id": request_id}}


class FullLogDisk:
    """Makes the app's log disk full and frees it again: a small tmpfs filled by a filler
    file where this process may mount one (root), else the app's RLIMIT_FSIZE set to one
    byte (every file write then fails with EFBIG; Python ignores SIGXFSZ)."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True)
        self.log_dir = log_dir
        self.filler = log_dir / "filler"
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                str(log_dir)], capture_output=True, check=False) \
            if os.geteuid() == 0 and shutil.which("mount") else None
        self.mounted = mount is not None and mount.returncode == 0
        self.pid = 0

    def fill(self) -> None:
        if not self.mounted:
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE,
                             (1, resource.prlimit(self.pid, resource.RLIMIT_FSIZE)[1]))
            return
        with self.filler.open("wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 65536)
                out.flush()

    def free(self) -> None:
        if not self.mounted:
            hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)[1]
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (hard, hard))
            return
        self.filler.unlink()

    def remove(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.log_dir)], check=False)


@pytest.mark.slow
def test_log_disk_full_for_5s_under_load_gives_no_500_and_leaks_no_slot(tmp_path: Path) \
        -> None:
    disk = FullLogDisk(tmp_path / "logs")
    app = AppProcess(tmp_path)
    try:
        app.start()
        disk.pid = app.pid
        texts = [f"Sentence {i % 120} spoken while the log disk fills up and frees again."
                 for i in range(200)]                     # misses, cache hits and joins
        answers: list[tuple[float, str, int, str, bytes]] = []
        fault: list[float] = []
        readiness: list[str] = []

        def one(text: str) -> None:
            status, content_type, body = app.post(text)
            answers.append((time.monotonic(), text, status, content_type, body))

        def inject() -> None:
            wait_until(lambda: len(answers) >= 20, 60, what="20 answers")
            disk.fill()
            fault.append(time.monotonic())
            while time.monotonic() < fault[0] + 5:
                readiness.append(app.get_json("/readyz")["reason"])
                time.sleep(0.2)
            disk.free()
            fault.append(time.monotonic())

        injector = threading.Thread(target=inject)
        injector.start()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, texts))
        injector.join(60)
        statuses = Counter(status for _, _, status, _, _ in answers)
        assert set(statuses) <= {200, 429}, statuses
        for _, _, status, content_type, body in answers:
            if status == 200:
                assert content_type == "audio/wav"
                assert body[:4] == b"RIFF"
            else:
                assert json.loads(body)["error"]["code"] == "QUEUE_FULL"
        assert any(fault[0] <= at <= fault[1] for at, *_ in answers)
        assert "log_write_failed" in readiness
        wait_until(lambda: app.get_json("/status")["waiting"] == 0
                   and app.get_json("/status")["running"] == 0, 30, what="queue empty")
        during = next(text for at, text, *_ in answers if at >= fault[0])
        status, content_type, body = app.post(during)
        assert (status, content_type, body[:4]) == (200, "audio/wav", b"RIFF")
        assert app.get_json("/status")["log_write_errors"] > 0
        wait_until(lambda: app.get_json("/readyz")["reason"] == "ready", 10,
                   what="readiness without log_write_failed")
    finally:
        app.process.stop()
        disk.remove()
