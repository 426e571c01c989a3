"""Fixtures: a real app (espeak backend, real sockets via aiohttp's test server) per test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from config.kubernetes.gen_manifests import deep_merge
from tests.support.local_stack import REPO, Process, free_port, http_get, wait_until
from tts_app.backends.base import Backend
from tts_app.backends.espeak import EspeakBackend
from tts_app.config import AppConfig, config_from_mapping
from tts_app.errors import ERRORS
from tts_app.logging import StructuredLog
from tts_app.server import STATE, AppState, build_app


async def expect_error(response: Any, code: str) -> dict[str, Any]:
    """``response`` is the JSON error body of ``code``, with its status and Retry-After."""
    body = await response.json()
    assert response.status == ERRORS[code].status, body
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] == response.headers["X-Request-ID"]
    assert body["error"]["message"]
    assert ("Retry-After" in response.headers) == ERRORS[code].retryable
    return dict(body)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_http(port: int, *parts: bytes, pause_s: float = 0.0,
                   timeout_s: float = 10.0) -> RawResponse | None:
    """Send ``parts`` over one connection (``pause_s`` apart: a slow or broken client no
    HTTP library would be), then read one response; None when the server closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for index, part in enumerate(parts):
            if index and pause_s:
                await asyncio.sleep(pause_s)
            writer.write(part)
            try:
                await writer.drain()
            except ConnectionError:
                break
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        except asyncio.IncompleteReadError:
            return None
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines if line)
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("Content-Length", 0))),
                                      timeout_s)
        return RawResponse(int(status_line.split()[1]), headers, body)
    finally:
        writer.close()


def post_head(path: str, length: int | None = None, extra: str = "") -> bytes:
    """A POST request head; chunked when ``length`` is None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (f"POST {path} HTTP/1.1\r\nHost: tts\r\nContent-Type: application/json\r\n"
            f"{extra}{framing}\r\n\r\n").encode()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Running:
    client: TestClient
    state: AppState
    config: AppConfig
    gate_file: Path

    @property
    def port(self) -> int:
        """The port the started test server listens on."""
        port = self.client.port
        assert port is not None, "the test server is not listening"
        return port

    @property
    def log_path(self) -> Path:
        """The log file, after the writer thread wrote everything logged so far."""
        assert self.state.log.flush(), "the log writer did not catch up"
        return Path(self.config.log.path)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_log(self.log_path) if event is None or r["event"] == event]


StartApp = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_app(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[StartApp]:
    logs: list[StructuredLog] = []

    async def start(overrides: dict[str, Any] | None = None, backend: Backend | None = None,
                    wait_ready: bool = True) -> Running:
        base = {"log": {"path": str(tmp_path / "logs" / "app.log")},
                "cache": {"dir": str(tmp_path / "cache")},
                "gate": {"file": str(tmp_path / "state" / "ingress.json"),
                         "check_interval_s": 0},
                "admission": {"rate_limit": {"enabled": False}}}
        config = config_from_mapping(deep_merge(base, overrides or {}))
        log = StructuredLog.from_config(config.log)
        logs.append(log)
        app = build_app(config, backend or EspeakBackend(), log)
        client = await aiohttp_client(app)
        state = app[STATE]
        if wait_ready:
            await state.settled.wait()
            assert state.ready, state.failed
        return Running(client, state, config, Path(config.gate.file))

    yield start
    for log in logs:
        log.close()


def write_gate(path: Path, is_open: bool, retry_after_s: int = 7) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"open": is_open, "reasons": [] if is_open else ["vram_high"],
                               "since": 1.0, "retry_after_s": retry_after_s}))
    tmp.replace(path)


class AppProcess:
    """``python -m tts_app`` as a child process (espeak, rate limit off) in ``workdir``."""

    def __init__(self, workdir: Path, overrides: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "logs" / "tts-app.log"
        config = deep_merge({
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "log": {"path": str(self.log_path)}, "cache": {"dir": str(workdir / "cache")},
            "gate": {"file": str(workdir / "state" / "ingress.json")},
            "admission": {"rate_limit": {"enabled": False}}}, overrides or {})
        config_path = workdir / "app.yaml"
        config_path.write_text(json.dumps(config))
        self.process = Process(
            "tts_app", [sys.executable, "-m", "tts_app", "--config", str(config_path)],
            self.base + "/readyz", workdir / "app.out", REPO)

    @property
    def pid(self) -> int:
        assert self.process.popen is not None
        return int(self.process.popen.pid)

    def start(self) -> AppProcess:
        self.process.start()
        wait_until(lambda: http_get(self.base + "/readyz")[0] == 200, 60,
                   what="the app ready")
        return self

    def get_json(self, path: str) -> Any:
        return json.loads(http_get(self.base + path)[1])

    def call(self, path: str, payload: Any = None, headers: dict[str, str] | None = None,
             ) -> tuple[int, dict[str, str], bytes]:
        """GET (no payload) or POST JSON ``path``; (status, headers, body) for any status."""
        request = urllib.request.Request(
            self.base + path, data=None if payload is None else json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def post(self, text: str) -> tuple[int, str, bytes]:
        """POST /v1/tts; (status, Content-Type, body) for any status."""
        request = urllib.request.Request(self.base + "/v1/tts",
                                         data=json.dumps({"text": text}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"] or "", exc.read()


class RedisServer:
    """A real ``redis-server`` on loopback (no persistence), stoppable and restartable on
    the same port to play an outage."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self._workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.command("PING") == b"+PONG", 10, what="redis-server up")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Redis up (connections accepted) but answering nothing: a slow Redis at its worst."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def command(self, *args: str) -> bytes | None:
        """One command in RESP; the raw first reply line, None when Redis does not answer."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                conn.sendall(request.encode())
                return conn.recv(65536).split(b"\r\n")[0]
        except OSError:
            return None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it: DEBIAN_PKGS)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
