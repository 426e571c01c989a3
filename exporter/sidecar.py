"""Assembles the sidecar from its parts and runs them until SIGTERM/SIGINT.

Each part is a :class:`Component`: something with ``start``/``stop`` coroutines and, if it
serves HTTP, ``routes``. Start order is the list order; stop is the reverse, so the log tailer
writes its last checkpoint after everything that feeds it has stopped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

from aiohttp import web

from exporter.config import Config
from exporter.gate import Gate, GateComponent
from exporter.logs.component import LogTailComponent
from exporter.logs.timelines import TimelineComponent
from exporter.metrics import SidecarMetrics
from exporter.server import build_app
from exporter.system.disk import DiskWatcher
from exporter.system.gpu import DeviceWatch, GpuCollector, make_source
from exporter.system.probe import AppProbe

log = logging.getLogger("exporter")

VERSION = "0.1.0"


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
    """The running sidecar: metrics, components and the HTTP server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = SidecarMetrics(
            duration_buckets_s=config.metrics.duration_buckets_s,
            text_length_buckets=config.metrics.text_length_buckets,
            version=VERSION,
        )
        self.components = build_components(config, self.metrics)
        routes = [route for component in self.components for route in component.routes]
        self.app = build_app(self.metrics, routes)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        for component in self.components:
            await component.start()
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.server.host, self.config.server.port)
        await site.start()
        log.info("tts-exporter %s listening on http://%s", VERSION, self.config.server.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
