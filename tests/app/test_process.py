"""The real process: ``python -m tts_app`` serves, SIGTERM drains in-flight work, and the whole
shutdown is bounded by drain_timeout_s plus a small constant, slow clients or not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.local_stack import free_port
from tts_app.__main__ import CLOSE_GRACE_S, SHUTDOWN_MARGIN_S

REPO = Path(__file__).resolve().parents[2]


def call(url: str, payload: dict | None = None) -> tuple[int, bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_process(tmp_path: Path, **server: object) -> tuple[subprocess.Popen[str], str]:
    """``python -m tts_app`` on a free port, ready; ``server`` overrides server.* keys."""
    port = free_port()
    config = tmp_path / "app.yaml"
    config.write_text(json.dumps({
        "server": {"listen": f"127.0.0.1:{port}", **server},
        "log": {"path": str(tmp_path / "app.log")}, "cache": {"dir": str(tmp_path / "c")},
        "gate": {"file": str(tmp_path / "gate.json")},
        "admission": {"queue_size": 64, "rate_limit": {"enabled": False}}}))
    process = subprocess.Popen([sys.executable, "-m", "tts_app", "--config", str(config)],
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if call(base + "/readyz")[0] == 200:
                return process, base
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise AssertionError(f"app did not become ready: {process.communicate()[1]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_then_exits_zero(tmp_path: Path) -> None:
    process, base = start_process(tmp_path, drain_timeout_s=20)
    try:
        long_text = " ".join(f"Sentence number {i} is spoken slowly and clearly."
                             for i in range(35))
        results: list[int] = []

        def worker(i: int) -> None:
            results.append(call(base + "/v1/tts", {"text": f"{i}. {long_text}"})[0])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while json.loads(call(base + "/status")[1])["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert process.wait(30) == 0
        assert results == [200] * 6
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    events = [json.loads(line)["event"] for line in (tmp_path / "app.log").read_text()
              .splitlines()]
    assert events[0] == "service_start"
    assert "drain_complete" in events
    assert events[-1] == "service_stop"
    assert events.count("synthesis_complete") == 6


@pytest.mark.slow
async def test_sigterm_with_slow_uploads_exits_within_the_drain_bound(tmp_path: Path) -> None:
    drain_s = 2.0
    # body_timeout_s far beyond the drain: the uploads are still trickling at SIGTERM
    process, base = start_process(tmp_path, drain_timeout_s=drain_s, body_timeout_s=60)
    port = int(base.rsplit(":", 1)[1])
    uploads = []
    try:
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/tts HTTP/1.1\r\nHost: tts\r\nContent-Length: 1000\r\n\r\n{")
            uploads.append((reader, writer))

        async def trickle() -> None:
            while True:
                await asyncio.sleep(0.3)
                for _reader, writer in uploads:
                    if not writer.is_closing():
                        writer.write(b" ")

        trickling = asyncio.create_task(trickle())
        await asyncio.sleep(1.0)
        status = json.loads((await asyncio.to_thread(call, base + "/status"))[1])
        assert status["running"] == 0
        assert process.poll() is None
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 120)
        elapsed = time.monotonic() - signalled
        trickling.cancel()
        assert code == 0, process.stderr.read() if process.stderr else ""
        # drain, then at most 2 x CLOSE_GRACE_S to close; margin for a busy CI machine
        assert elapsed < drain_s + 2 * CLOSE_GRACE_S + 3, elapsed
        assert elapsed < drain_s + SHUTDOWN_MARGIN_S
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for _reader, writer in uploads:
            writer.close()
    events = [json.loads(line)["event"] for line in (tmp_path / "app.log").read_text()
              .splitlines()]
    assert "drain_complete" in events
    assert events[-1] == "service_stop"


@pytest.mark.slow
async def test_a_request_head_not_sent_in_time_closes_the_connection(tmp_path: Path) -> None:
    process, base = start_process(tmp_path, header_timeout_s=1)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1",
                                                      int(base.rsplit(":", 1)[1]))
        writer.write(b"POST /v1/tts HTTP/1.1\r\nHost: tts\r\nX-Slow: ")
        opened = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while not writer.is_closing():
                    await asyncio.sleep(0.2)
                    writer.write(b"a")
                    await writer.drain()

        trickling = asyncio.create_task(trickle())
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        closed_after = time.monotonic() - opened
        trickling.cancel()
        writer.close()
        assert 0.8 < closed_after < 5, closed_after
        assert call(base + "/healthz")[0] == 200      # the server itself is fine
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow
def test_shutdown_watchdog_exits_even_when_a_thread_never_returns() -> None:
    # a thread that never returns is what a hung synthesis leaves; the interpreter would
    # join it at exit forever
    script = ("import threading, time\n"
              "from tts_app.__main__ import _exit_by\n"
              "threading.Thread(target=time.sleep, args=(60,)).start()\n"
              "_exit_by(0.5)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "shutdown took over 0.5 s" in result.stderr
    assert time.monotonic() - started < 10
