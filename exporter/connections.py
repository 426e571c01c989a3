"""Bounds on the sidecar's open connections: read timeouts, a connection cap that keeps the gate
reachable, and quiet handling of a full file-descriptor table.

- A connection must deliver a complete request head within ``read_header_timeout_s`` of
  connecting or of its previous response; otherwise it is closed. (Bodies have their own
  timeout where they are read, :func:`exporter.server.json_body`.)
- At most ``max_connections`` are open. A new connection past the cap closes the oldest
  connection that has no request in progress (a slow or half-sent client, an idle keep-alive),
  so a probe that sends its request at once (``GET /ingress``) is still served while an
  attacker holds the cap. Only when every connection is busy is the new one refused.
- ``accept()`` failing for lack of file descriptors (EMFILE) is counted every time and logged
  at most once a minute, instead of asyncio's error line per retry. The bound is lowered at
  start-up to what RLIMIT_NOFILE leaves (:func:`fd_headroom`), and the listener accepts at most
  ``ACCEPT_BACKLOG`` connections per loop turn, so the reserve absorbs a burst before evicted
  connections release their descriptors.

Each closed or refused connection counts in ``tts_exporter_http_connections_closed_total
{reason}`` (``header_timeout``, ``evicted``, ``refused``, ``accept_failed``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from exporter.metrics import SidecarMetrics

log = logging.getLogger("exporter.server")

ACCEPT_BACKLOG = 64
"""The listen backlog; asyncio also accepts at most this many connections per loop turn."""
FD_RESERVE = 2 * ACCEPT_BACKLOG
"""File descriptors kept for everything but client connections: one accept burst, log files,
the checkpoint and gate file writes, watchdog, the probe's client."""
ACCEPT_LOG_INTERVAL_S = 60.0


def fd_headroom(reserve: int = FD_RESERVE) -> int:
    """Connections the process's soft RLIMIT_NOFILE leaves room for, after what is open now
    and a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16
    return max(1, soft - in_use - reserve)


class _Conn:
    __slots__ = ("busy", "deadline", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.deadline: asyncio.TimerHandle | None = None
        self.busy = 0


class ConnectionGuard:
    """Hooks a :class:`aiohttp.web.Server`'s connection callbacks (:meth:`attach`) and the
    application's request path (:meth:`middleware`)."""

    def __init__(self, metrics: SidecarMetrics, max_connections: int,
                 read_header_timeout_s: float) -> None:
        self.metrics = metrics
        self.max_connections = max_connections
        self.read_header_timeout_s = read_header_timeout_s
        self._conns: dict[RequestHandler, _Conn] = {}  # insertion order: oldest first
        self._accept_failures = 0       # since the last log line
        self._accept_logged_at: float | None = None

    def __len__(self) -> int:
        return len(self._conns)

    def attach(self, server: web.Server, loop: asyncio.AbstractEventLoop) -> None:
        """Track ``server``'s connections, and take over ``loop``'s report of failed accepts.

        aiohttp has no public hook for new connections; its request handlers report each one
        to these two methods of their ``web.Server``, so wrapping them on the instance sees
        every connection before its first byte is parsed.
        """
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._opened(handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self._closed(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        previous = loop.get_exception_handler()

        def exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if self._accept_failed(context):
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(exception_handler)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) \
            -> web.StreamResponse:
        """Marks the connection busy while a request is handled: no header timeout, never
        evicted; the timeout starts again after the response."""
        conn = self._conns.get(request.protocol)
        if conn is None:
            return await handler(request)
        conn.busy += 1
        self._disarm(conn)
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            if conn.busy == 0 and not conn.transport.is_closing():
                self._arm(request.protocol, conn)

    # --- internals ------------------------------------------------------------------------

    def _opened(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        conn = _Conn(transport)
        self._arm(handler, conn)
        self._conns[handler] = conn
        if len(self._conns) <= self.max_connections:
            return
        idle = next((h for h, c in self._conns.items() if c.busy == 0 and h is not handler),
                    None)
        self._close(idle or handler, "evicted" if idle is not None else "refused")

    def _closed(self, handler: RequestHandler) -> None:
        conn = self._conns.pop(handler, None)
        if conn is not None:
            self._disarm(conn)

    def _arm(self, handler: RequestHandler, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn.deadline = loop.call_later(self.read_header_timeout_s, self._expired, handler)

    @staticmethod
    def _disarm(conn: _Conn) -> None:
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None

    def _expired(self, handler: RequestHandler) -> None:
        conn = self._conns.get(handler)
        if conn is not None and conn.busy == 0:
            self._close(handler, "header_timeout")

    def _close(self, handler: RequestHandler, reason: str) -> None:
        conn = self._conns.pop(handler, None)
        if conn is not None:
            self._disarm(conn)
            conn.transport.abort()
        self._count(reason)

    def _count(self, reason: str) -> None:
        self.metrics.count(self.metrics.http_connections_closed, (reason,))

    def _accept_failed(self, context: dict[str, Any]) -> bool:
        """True for asyncio's report of an ``accept()`` out of resources (it retries by
        itself a second later): counted every time, logged at most once a minute."""
        if not str(context.get("message", "")).startswith("socket.accept() out of system"):
            return False
        self._count("accept_failed")
        self._accept_failures += 1
        now = asyncio.get_running_loop().time()
        if self._accept_logged_at is None or \
                now - self._accept_logged_at >= ACCEPT_LOG_INTERVAL_S:
            log.error("cannot accept connections: %s (%d open, %d failed accept(s); logged at "
                      "most once a minute, each counted in tts_exporter_http_connections_"
                      "closed_total{reason=\"accept_failed\"})", context.get("exception"),
                      len(self._conns), self._accept_failures)
            self._accept_logged_at = now
            self._accept_failures = 0
        return True
