"""The real sidecar process under connection abuse: half-sent requests are closed after the read
timeout, the connection bound keeps ``GET /ingress`` answering, and a low open-file limit does
not flood the log."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import Sidecar
from tests.support.local_stack import wait_until

pytestmark = pytest.mark.slow

HALF_SENT = b"GET /ingress HTTP/1.1\r\nHost: sidecar\r\nX-Slow: "


def open_half_sent(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that each send part of a request head, and then nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(HALF_SENT)
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_sent_requests_are_closed_and_the_gate_answers_past_the_bound(
        start_sidecar: Callable[..., Sidecar]) -> None:
    sidecar = start_sidecar({"server": {"read_header_timeout_s": 1.5, "max_connections": 100}})
    sockets = open_half_sent(sidecar.port, 300)
    try:
        started = time.monotonic()
        status, _ = sidecar.request("/ingress")
        assert status == 200
        assert time.monotonic() - started < 2.0
        assert all(closed_by_peer(sock, timeout=10) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    closed = {dict(labels)["reason"]: value for labels, value in
              sidecar.samples("tts_exporter_http_connections_closed_total").items()}
    assert closed.get("header_timeout", 0) + closed.get("evicted", 0) >= 300, closed
    assert closed.get("evicted", 0) > 0, closed   # the bound of 100 was hit


def test_a_low_open_file_limit_neither_floods_the_log_nor_stops_the_gate(
        start_sidecar: Callable[..., Sidecar]) -> None:
    sidecar = start_sidecar({"server": {"read_header_timeout_s": 30, "max_connections": 1000}},
                            nofile=256)
    sockets = open_half_sent(sidecar.port, 400)
    try:
        time.sleep(3)   # asyncio retries a failed accept() every second
        status, _ = sidecar.request("/ingress")
        assert status == 200
    finally:
        for sock in sockets:
            sock.close()
    log = sidecar.log.read_text(errors="replace")
    assert "server.max_connections 1000 lowered to" in log
    assert log.count("Too many open files") + log.count("out of system resource") <= 1, log


def test_long_voice_names_do_not_grow_the_sidecar(start_sidecar: Callable[..., Sidecar]) -> None:
    """1,500 lines with 60 KB voice names (90 MB): the request timelines keep them shortened
    within their byte bound, so the sidecar's memory barely moves."""
    sidecar = start_sidecar({})
    before = sidecar.rss_mib()
    with (sidecar.workdir / "logs" / "app.log").open("w") as log:
        for i in range(1500):
            log.write(json.dumps({"time": i, "level": "INFO", "event": "synthesis_start",
                                  "request_id": f"r{i}", "voice": "v" * 60_000,
                                  "text_len": 5}) + "\n")

    def counted() -> bool:
        return sum(sidecar.samples("tts_exporter_log_lines_total").values()) >= 1500

    wait_until(counted, timeout=120, interval=0.5, what="every line counted")
    assert sidecar.rss_mib() - before < 40, (before, sidecar.rss_mib())
    status, body = sidecar.request("/requests/r1499")
    voice = json.loads(body)["records"][0]["fields"]["voice"]
    assert status == 200
    assert voice.endswith("…")
    assert len(voice) < 1000
