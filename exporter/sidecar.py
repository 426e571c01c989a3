"""Assembles the sidecar from its parts and runs them until SIGTERM/SIGINT.

Each part is a :class:`Component`: something with ``start``/``stop`` coroutines and, if it
serves HTTP, ``routes``. Start order is the list order; stop is the reverse, so the log tailer
writes its last checkpoint after everything that feeds it has stopped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from exporter import __version__
from exporter.config import Config
from exporter.connections import ACCEPT_BACKLOG, ConnectionGuard, fd_headroom
from exporter.gate import Gate, GateComponent
from exporter.logs.component import LogTailComponent
from exporter.logs.timelines import TimelineComponent
from exporter.metrics import SidecarMetrics
from exporter.server import build_app
from exporter.system.disk import DiskWatcher
from exporter.system.gpu import DeviceWatch, GpuCollector, make_source
from exporter.system.probe import AppProbe
from exporter.webconfig import BasicAuth, WebConfig

log = logging.getLogger("exporter")

GIL_SWITCH_INTERVAL_S = 0.001


class StartupError(Exception):
    """The sidecar cannot start (a busy port, an unwritable file); the message is one line for
    the operator."""


class Component(Protocol):
    """A long-running part of the sidecar."""

    routes: list[web.RouteDef]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_components(config: Config, metrics: SidecarMetrics) -> list[Component]:
    """The parts the config asks for, in start order."""
    components: list[Component] = []
    components += _log_components(config, metrics)
    components += _system_components(config, metrics)
    return components


def _log_components(config: Config, metrics: SidecarMetrics) -> list[Component]:
    """The log tailer feeding the pipeline and the recent request timelines (``/requests``).
    The tailer comes first, so it stops last and its final checkpoint holds every line read
    before shutdown."""
    if not config.logs.tailed_paths():
        return []
    if not config.timelines.enabled:
        return [LogTailComponent.from_config(config, metrics)]
    timelines = TimelineComponent.from_config(config)
    return [LogTailComponent.from_config(config, metrics, on_records=timelines.store.add),
            timelines]


def _system_components(config: Config, metrics: SidecarMetrics) -> list[Component]:
    """Gate, probe, GPU and disk. The gate comes before the GPU collector, which feeds it;
    the probe too, so that the first GPU poll already follows the devices the app reports."""
    parts: list[Component] = []
    gate = None
    if config.gate.enabled:
        gate = Gate.from_config(config.gate, stale_after_s=config.gpu.stale_after_s)
        parts.append(GateComponent(gate, config.gate, config.auth, metrics))
    gpu = GpuCollector(make_source(config.gpu.source), metrics, gate,
                       config.gpu.poll_interval_s, config.gpu.stale_after_s,
                       DeviceWatch(config.gpu.device_list()))
    if config.probe.url:
        parts.append(AppProbe(config.probe.url, metrics, config.probe.interval_s,
                              config.probe.timeout_s, on_status=gpu.on_app_status))
    parts.append(gpu)
    if config.disk.paths:
        parts.append(DiskWatcher(config.disk.paths, metrics, config.disk.thresholds,
                                 config.disk.reconcile_interval_s, config.disk.poll_interval_s))
    return parts


class Sidecar:
    """The running sidecar: metrics, components and the HTTP server (TLS and basic auth as
    ``web_config`` says, connections bounded by :class:`ConnectionGuard`)."""

    def __init__(self, config: Config, web_config: WebConfig | None = None) -> None:
        self.config = config
        self.web_config = web_config or WebConfig()
        self.metrics = SidecarMetrics(
            duration_buckets_s=config.metrics.duration_buckets_s,
            text_length_buckets=config.metrics.text_length_buckets,
            version=__version__,
        )
        self.components = build_components(config, self.metrics)
        routes = [route for component in self.components for route in component.routes]
        server = config.server
        self.guard = ConnectionGuard(self.metrics, server.max_connections,
                                     server.read_header_timeout_s)
        middlewares: list[Middleware] = [self.guard.middleware]
        if self.web_config.users:
            auth = BasicAuth(self.web_config.users)
            middlewares.append(auth.middleware(server.unauthenticated_paths))
        self.app = build_app(self.metrics, routes, config=server, middlewares=middlewares)
        self._runner: web.AppRunner | None = None
        self._started: list[Component] = []

    async def start(self) -> None:
        # CPU-bound threads (tailer, renders) hand the GIL back this often, so the event loop
        # that answers the gate waits at most this long for it (Python's default is 5 ms).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        for component in self.components:
            try:
                await component.start()
            except OSError as exc:
                raise StartupError(f"{type(component).__name__} cannot start: {exc}") from None
            self._started.append(component)
        server = self.config.server
        headroom = fd_headroom()
        if headroom < self.guard.max_connections:
            log.warning("server.max_connections %d lowered to %d to fit the open-file limit "
                        "(RLIMIT_NOFILE)", self.guard.max_connections, headroom)
            self.guard.max_connections = headroom
        # aiohttp's keep-alive timer also closes a connection idle before its first request.
        self._runner = web.AppRunner(self.app, access_log=None,
                                     keepalive_timeout=server.read_header_timeout_s)
        await self._runner.setup()
        assert self._runner.server is not None
        self.guard.attach(self._runner.server, asyncio.get_running_loop())
        site = web.TCPSite(self._runner, server.host, server.port,
                           ssl_context=self.web_config.ssl_context, backlog=ACCEPT_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"server.listen: cannot listen on {server.listen} "
                               f"({exc.strerror})") from None
        log.info("tts-exporter %s listening on %s://%s", __version__,
                 "https" if self.web_config.ssl_context else "http", server.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for component in reversed(self._started):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()
