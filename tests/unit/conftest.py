"""Helpers shared by the unit tests (raw HTTP on a real socket, load on the gate, test TLS
certificates, inotify at its limits; the integration tests reuse the certificates)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from exporter.logs import watch as watch_module


async def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` bytes as they are (no client-side validation of headers or body) to
    127.0.0.1:``port``; the answer's status and body (by its Content-Length, else to EOF)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        body = await asyncio.wait_for(
            reader.read() if length is None else reader.readexactly(length), timeout)
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1]), body


def http_request(method: str, path: str, headers: dict[str, bytes] | None = None,
                 body: bytes = b"") -> bytes:
    """An HTTP/1.1 request with ``Connection: close`` and a Content-Length for ``body``."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: test", b"Connection: close",
             b"Content-Length: " + str(len(body)).encode()]
    lines += [name.encode() + b": " + value for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def gate_latencies_while_hammered(port: int, path: str, clients: int,
                                        probes: int = 40) -> list[float]:
    """Seconds each of ``probes`` sequential ``GET /ingress`` took while ``clients`` clients
    requested ``path`` back to back on the same server."""
    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def hammer() -> None:
            while not stop.is_set():
                async with session.get(base + path) as response:
                    await response.read()

        async def probe() -> list[float]:
            await asyncio.sleep(0.2)   # let the hammering start
            latencies = []
            for _ in range(probes):
                started = time.perf_counter()
                async with session.get(base + "/ingress") as response:
                    await response.read()
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)
            stop.set()
            return latencies

        hammers = [asyncio.ensure_future(hammer()) for _ in range(clients)]
        try:
            return await probe()
        finally:
            stop.set()
            await asyncio.gather(*hammers, return_exceptions=True)


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate,
    all signed by the CA (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed(directory: Path, name: str, cn: str, ca: Path, ca_key: Path,
            extensions: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext_file))
    return cert, key


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI makes the test certificates")
    directory = tmp_path_factory.mktemp("tls")
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=tts-test-ca",
             "-days", "2")
    server_cert, server_key = _signed(directory, "server", "localhost", ca, ca_key,
                                      "subjectAltName=IP:127.0.0.1,DNS:localhost")
    client_cert, client_key = _signed(directory, "client", "prometheus", ca, ca_key,
                                      "extendedKeyUsage=clientAuth")
    return TlsFiles(ca, server_cert, server_key, client_cert, client_key)


@dataclass
class InotifyLimits:
    """Which of the kernel's inotify limits :class:`DirectoryWatch` runs into: instances
    (``fs.inotify.max_user_instances``, EMFILE on opening) or watches
    (``max_user_watches``, ENOSPC on adding one)."""

    instances: bool = False
    watches: bool = False


@pytest.fixture
def inotify_limits(monkeypatch: pytest.MonkeyPatch) -> InotifyLimits:
    """The real inotify, failing as the returned limits say (switch them in the test)."""
    limits = InotifyLimits()

    class LimitedINotify(watch_module.INotify):
        def __init__(self, *args: object, **kwargs: object) -> None:
            if limits.instances:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            super().__init__(*args, **kwargs)

        def add_watch(self, path: str, mask: int) -> int:
            if limits.watches:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return int(super().add_watch(path, mask))

    monkeypatch.setattr(watch_module, "INotify", LimitedINotify)
    return limits
