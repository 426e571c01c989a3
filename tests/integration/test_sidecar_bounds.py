"""The real sidecar process under connection abuse: half-sent requests are closed after the read
timeout, the connection bound keeps ``GET /ingress`` answering, and a low open-file limit does
not flood the log."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import REPO, load_local_stack

stack = load_local_stack()
pytestmark = pytest.mark.slow

HALF_SENT = b"GET /ingress HTTP/1.1\r\nHost: sidecar\r\nX-Slow: "


class Sidecar:
    """``python -m exporter`` on a free port with ``server`` settings, optionally under a
    lowered RLIMIT_NOFILE."""

    def __init__(self, workdir: Path, server: dict[str, Any], nofile: int | None = None) -> None:
        self.port = stack.free_port()
        self.log = workdir / "exporter.out"
        (workdir / "logs").mkdir()
        stack.write_gpu_file(workdir / "gpu.json", 0.40)
        config = {
            "server": {"listen": f"127.0.0.1:{self.port}", **server},
            "logs": {"paths": [str(workdir / "logs" / "*.log")],
                     "checkpoint_path": str(workdir / "state" / "offsets.json")},
            "gpu": {"source": f"file:{workdir / 'gpu.json'}"},
            "gate": {"gate_file": str(workdir / "state" / "ingress.json")},
        }
        path = workdir / "exporter.yaml"
        path.write_text(yaml.safe_dump(config))

        def limit_files() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "exporter", "--config", str(path)], cwd=REPO,
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit_files)
        stack.wait_until(lambda: stack.http_get(self.url("/healthz"))[0] == 200, timeout=20,
                         what="the sidecar to listen")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def closed_connections(self) -> dict[str, float]:
        _, body = stack.http_get(self.url("/metrics"))
        return {s.labels["reason"]: s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples
                if s.name == "tts_exporter_http_connections_closed_total"}

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(15)


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    started: list[Sidecar] = []

    def start(server: dict[str, Any], nofile: int | None = None) -> Sidecar:
        started.append(Sidecar(tmp_path, server, nofile))
        return started[-1]

    yield start
    for sidecar in started:
        sidecar.stop()


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
    sidecar = start_sidecar({"read_header_timeout_s": 1.5, "max_connections": 100})
    sockets = open_half_sent(sidecar.port, 300)
    try:
        started = time.monotonic()
        status, _ = stack.http_get(sidecar.url("/ingress"), timeout=5)
        assert status == 200 and time.monotonic() - started < 2.0
        assert all(closed_by_peer(sock, timeout=10) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    closed = sidecar.closed_connections()
    assert closed.get("header_timeout", 0) + closed.get("evicted", 0) >= 300, closed
    assert closed.get("evicted", 0) > 0, closed   # the bound of 100 was hit


def test_a_low_open_file_limit_neither_floods_the_log_nor_stops_the_gate(
        start_sidecar: Callable[..., Sidecar]) -> None:
    sidecar = start_sidecar({"read_header_timeout_s": 30, "max_connections": 1000},
                            nofile=256)
    sockets = open_half_sent(sidecar.port, 400)
    try:
        time.sleep(3)   # asyncio retries a failed accept() every second
        status, _ = stack.http_get(sidecar.url("/ingress"), timeout=5)
        assert status == 200
    finally:
        for sock in sockets:
            sock.close()
    log = sidecar.log.read_text(errors="replace")
    assert "server.max_connections 1000 lowered to" in log
    assert log.count("Too many open files") + log.count("out of system resource") <= 1, log
