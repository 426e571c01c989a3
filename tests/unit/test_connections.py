"""The connection guard on a real aiohttp server: a real EMFILE from accept() is counted every
time and logged once, and a busy connection is never evicted for a new one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from exporter.connections import ConnectionGuard
from exporter.metrics import SidecarMetrics
from tests.unit.conftest import http_request, raw_request


@contextlib.asynccontextmanager
async def guarded_server(guard: ConnectionGuard, routes: list[web.RouteDef]) \
        -> AsyncIterator[int]:
    app = web.Application(middlewares=[guard.middleware])
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    guard.attach(runner.server, loop)
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    try:
        yield listener.getsockname()[1]
    finally:
        await runner.cleanup()
        loop.set_exception_handler(previous)


async def ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.mark.slow
async def test_accept_out_of_file_descriptors_is_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = SidecarMetrics()
    guard = ConnectionGuard(metrics, max_connections=10, read_header_timeout_s=30)
    async with guarded_server(guard, [web.get("/", ok)]) as port:
        clients = [socket.socket() for _ in range(3)]
        for client in clients:
            client.setblocking(False)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8,
                                                        hard))
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            with caplog.at_level(logging.ERROR, logger="exporter.server"):
                for client in clients:
                    client.connect_ex(("127.0.0.1", port))
                await asyncio.sleep(2.5)   # asyncio retries a failed accept every second
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for client in clients:
                client.close()
        failures = metrics.http_connections_closed.get(("accept_failed",))
        assert failures >= 2
        assert len([r for r in caplog.records if "cannot accept" in r.message]) == 1
        assert (await raw_request(port, http_request("GET", "/")))[0] == 200


async def test_a_busy_connection_is_not_evicted_and_the_newest_is_refused() -> None:
    metrics = SidecarMetrics()
    guard = ConnectionGuard(metrics, max_connections=1, read_header_timeout_s=30)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    async with guarded_server(guard, [web.get("/slow", slow), web.get("/", ok)]) as port:
        busy = asyncio.ensure_future(raw_request(port, http_request("GET", "/slow")))
        await entered.wait()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""   # refused: closed at once
        writer.close()
        release.set()
        assert await busy == (200, b"done")
    assert metrics.http_connections_closed.get(("refused",)) == 1
