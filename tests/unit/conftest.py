"""Helpers shared by the unit tests that talk raw HTTP to a real socket."""

from __future__ import annotations

import asyncio


async def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` bytes as they are (no client-side validation of headers or body) to
    127.0.0.1:``port``; the answer's status and body. The request should ask to close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), body


def http_request(method: str, path: str, headers: dict[str, bytes] | None = None,
                 body: bytes = b"") -> bytes:
    """An HTTP/1.1 request with ``Connection: close`` and a Content-Length for ``body``."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: test", b"Connection: close",
             b"Content-Length: " + str(len(body)).encode()]
    lines += [name.encode() + b": " + value for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
