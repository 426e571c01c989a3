"""The sidecar's HTTP surface (aiohttp): landing page, ``/metrics``, ``/healthz``.

Other parts (the gate, the request timelines) bring their own routes; :func:`build_app` mounts
them, so this module stays about exposition and health.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from exporter.metrics import SidecarMetrics

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


def build_registry(metrics: SidecarMetrics) -> CollectorRegistry:
    """One registry: our families plus the sidecar's own ``process_*`` and ``python_info``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.registry)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def build_app(
    metrics: SidecarMetrics,
    routes: Iterable[web.RouteDef] = (),
    health: Callable[[], dict[str, object]] | None = None,
) -> web.Application:
    """The aiohttp application: exposition and health, plus the routes other parts bring."""
    registry = build_registry(metrics)

    async def landing(_: web.Request) -> web.Response:
        return web.Response(text=LANDING_PAGE, content_type="text/html")

    async def metrics_handler(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **(health() if health else {})})

    app = web.Application()
    app.add_routes([
        web.get("/", landing),
        web.get("/metrics", metrics_handler),
        web.get("/healthz", healthz),
        *routes,
    ])
    return app
