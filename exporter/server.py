"""The sidecar's HTTP surface (aiohttp): landing page, ``/metrics``, ``/healthz``, and what every
route shares: bounded JSON bodies and work kept off the event loop.

Other parts (the gate, the request timelines) bring their own routes; :func:`build_app` mounts
them, so this module stays about exposition and health.

The event loop answers ``GET /ingress``; nothing that grows with input runs on it. Rendering
``/metrics`` and listing ``/requests`` run on one worker thread (:class:`OffLoop`), so at most
one such job competes with the loop at a time, and concurrent scrapes share one render.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from exporter.config import ServerConfig
from exporter.metrics import SidecarMetrics

T = TypeVar("T")

LANDING_PAGE = """<!doctype html>
<html><head><title>tts-sentinel exporter</title></head>
<body><h1>tts-sentinel exporter</h1>
<p>Prometheus exporter and ingress gate for TTS inference services.</p>
<ul>
<li><a href="/metrics">/metrics</a> &mdash; Prometheus text or OpenMetrics (by Accept)</li>
<li><a href="/healthz">/healthz</a> &mdash; the sidecar's own liveness</li>
<li><a href="/ingress">/ingress</a> &mdash; the ingress gate (200 open, 503/403 closed)</li>
<li><a href="/requests?status=failed&amp;limit=20">/requests</a> &mdash; recent request
timelines</li>
</ul></body></html>
"""

class OffLoop:
    """One worker thread for request work that grows with input (renders, scans), and
    single-flight sharing: callers asking for the same key while a job runs get its result.

    The worker rests as long as its last job ran before it starts the next, so however many
    clients queue work it holds the interpreter at most half the time and the event loop that
    answers the gate keeps getting it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-work")
        self._running: dict[object, asyncio.Future[Any]] = {}
        self._clock, self._sleep = clock, sleep
        self._rest_until = 0.0

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._paced,
                                                                fn)

    def _paced(self, fn: Callable[[], T]) -> T:
        rest = self._rest_until - self._clock()
        if rest > 0:
            self._sleep(rest)
        started = self._clock()
        try:
            return fn()
        finally:
            now = self._clock()
            self._rest_until = now + (now - started)

    async def shared(self, key: object, fn: Callable[[], T]) -> T:
        """``fn()`` on the worker, or the result of the same key's job already running (it
        started after or while the caller's request arrived, so it is as fresh)."""
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(self.run(fn))
            self._running[key] = future
            future.add_done_callback(lambda _: self._running.pop(key, None))
        result: T = await asyncio.shield(future)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


OFF_LOOP = web.AppKey("off_loop", OffLoop)
SERVER_CONFIG = web.AppKey("server_config", ServerConfig)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def json_body(request: web.Request) -> Any:
    """The request body as JSON, or a 4xx: 413 past ``server.max_body_bytes`` (aiohttp's
    ``client_max_size``), 408 past ``server.read_body_timeout_s``, 400 for anything that is
    not strict JSON (invalid UTF-8, NaN/Infinity, nesting deeper than the parser's stack)."""
    timeout = request.app[SERVER_CONFIG].read_body_timeout_s
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise _json_error(web.HTTPRequestTimeout, "request body not received in time") from None
    try:
        # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates through.
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise _json_error(web.HTTPBadRequest, "body is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _json_error(web.HTTPBadRequest, f"body is not JSON: {exc}") from None


def _json_error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": message}), content_type="application/json")


def build_registry(metrics: SidecarMetrics) -> CollectorRegistry:
    """One registry: our families plus the sidecar's own ``process_*`` and ``python_info``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.metric_set)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def build_app(
    metrics: SidecarMetrics,
    routes: Iterable[web.RouteDef] = (),
    health: Callable[[], dict[str, object]] | None = None,
    config: ServerConfig | None = None,
    middlewares: Iterable[Middleware] = (),
) -> web.Application:
    """The aiohttp application: exposition and health, plus the routes other parts bring."""
    config = config or ServerConfig()
    registry = build_registry(metrics)
    off_loop = OffLoop()

    async def landing(_: web.Request) -> web.Response:
        return web.Response(text=LANDING_PAGE, content_type="text/html")

    async def metrics_handler(request: web.Request) -> web.Response:
        try:
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        except (TypeError, ValueError):  # a malformed version=; the classic format then
            encoder, content_type = choose_encoder("")
        body = await off_loop.shared(content_type, lambda: encoder(registry))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **(health() if health else {})})

    async def close_off_loop(_: web.Application) -> None:
        off_loop.close()

    app = web.Application(client_max_size=config.max_body_bytes, middlewares=list(middlewares))
    app[OFF_LOOP] = off_loop
    app[SERVER_CONFIG] = config
    app.on_cleanup.append(close_off_loop)
    app.add_routes([
        web.get("/", landing),
        web.get("/metrics", metrics_handler),
        web.get("/healthz", healthz),
        *routes,
    ])
    return app
