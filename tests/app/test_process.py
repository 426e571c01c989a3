"""The real process: ``python -m tts_app`` serves, and SIGTERM drains in-flight work."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(url: str, payload: dict | None = None) -> tuple[int, bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
def test_sigterm_finishes_in_flight_then_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "app.yaml"
    config.write_text(json.dumps({
        "server": {"listen": f"127.0.0.1:{port}", "drain_timeout_s": 20},
        "log": {"path": str(tmp_path / "app.log")}, "cache": {"dir": str(tmp_path / "c")},
        "gate": {"file": str(tmp_path / "gate.json")},
        "admission": {"queue_size": 64, "rate_limit": {"enabled": False}}}))
    process = subprocess.Popen([sys.executable, "-m", "tts_app", "--config", str(config)],
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if call(base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
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
    assert events[0] == "service_start" and "drain_complete" in events
    assert events[-1] == "service_stop"
    assert events.count("synthesis_complete") == 6
