"""Helpers shared by the unit tests that talk raw HTTP to a real socket."""

from __future__ import annotations

import asyncio
import time

import aiohttp


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
