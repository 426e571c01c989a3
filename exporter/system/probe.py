"""App probe: polls the TTS app's ``/status`` for what logs cannot tell — the queue right now,
and whether the process is up and the same one as before.

The contract (what the co-packaged app serves; any service answering it can be watched)::

    {"waiting": 3, "running": 2, "capacity": 64, "started_at": 1718200000.5, "pid": 4242,
     "backend": "chattts", "model_version": "0.2.5", "ready": true, "log_write_errors": 0}

Output::

    tts_app_up 1
    tts_requests_waiting 3
    tts_requests_running 2
    tts_requests_capacity 64
    tts_app_restarts_total 1     # a different (started_at, pid) than the last answer
    tts_app_log_write_errors_total 7

``pid`` is optional: a new ``started_at`` alone is a restart. ``log_write_errors`` is optional
(log records the app could not write, cumulative since it started; >= 0).

On a failed probe (refused, timeout, non-200, not the contract) ``tts_app_up`` is 0 and the
queue gauges disappear: the last queue depth of a dead process is not a fact any more.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from exporter.metrics import SidecarMetrics

log = logging.getLogger("exporter.probe")


class ProbeError(Exception):
    """The app did not answer ``/status`` with the contract; the message says how."""


@dataclass(frozen=True)
class AppStatus:
    """The part of ``/status`` the sidecar uses."""

    waiting: int
    running: int
    capacity: int
    started_at: float
    pid: int | None = None
    log_write_errors: int | None = None

    @classmethod
    def parse(cls, data: Any) -> AppStatus:
        if not isinstance(data, dict):
            raise ProbeError("expected a JSON object")
        values: dict[str, Any] = {}
        for key, wanted in (("waiting", int), ("running", int), ("capacity", int),
                            ("started_at", float), ("pid", int), ("log_write_errors", int)):
            value = data.get(key)
            if key in ("pid", "log_write_errors") and value is None:   # optional
                continue
            allowed = (int, float) if wanted is float else (int,)
            if isinstance(value, bool) or not isinstance(value, allowed):
                kind = "a number" if wanted is float else "an integer"
                raise ProbeError(f"{key}: expected {kind}, got {value!r}")
            values[key] = wanted(value)
        if values.get("log_write_errors", 0) < 0:
            raise ProbeError("log_write_errors: expected an integer >= 0")
        return cls(**values)


class AppProbe:
    """The probe component: one GET every ``interval_s``, bounded by ``timeout_s``."""

    routes: list[web.RouteDef]

    def __init__(self, url: str, metrics: SidecarMetrics, interval_s: float = 1.0,
                 timeout_s: float = 1.0) -> None:
        self.routes = []
        self.url = url
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._identity: tuple[float, int | None] | None = None
        self._failures = 0

    async def start(self) -> None:
        with self.metrics.registry.lock:  # the error series exists at 0, so rate() works
            self.metrics.collector_errors.inc(("probe",), 0.0)
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        started = asyncio.get_running_loop().time()
        await self.probe_once()
        self._task = asyncio.create_task(self._run(started), name="app-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _run(self, started: float) -> None:
        """One call every ``interval_s``, counted from the start of the previous one (``start``
        made the first)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))
            started = loop.time()
            await self.probe_once()

    async def probe_once(self) -> None:
        """One probe; never raises (a broken app is a metric, not a sidecar crash)."""
        try:
            status = await self._fetch()
        except ProbeError as exc:
            self._failed(str(exc))
            return
        if self._failures:
            log.info("app %s answers again after %d failed probes", self.url, self._failures)
            self._failures = 0
        identity = (status.started_at, status.pid)
        restarted = self._identity is not None and identity != self._identity
        if restarted:
            log.warning("app restarted: started_at %s -> %s, pid %s -> %s",
                        self._identity and self._identity[0], status.started_at,
                        self._identity and self._identity[1], status.pid)
        self._identity = identity
        m = self.metrics
        with m.registry.lock:
            m.app_up.set((), 1.0)
            m.requests_waiting.set((), float(status.waiting))
            m.requests_running.set((), float(status.running))
            m.requests_capacity.set((), float(status.capacity))
            if restarted:
                m.app_restarts.inc()
            if status.log_write_errors is not None:
                # The app's own count since it started; its restart is a counter reset.
                m.app_log_write_errors.values[()] = float(status.log_write_errors)

    async def _fetch(self) -> AppStatus:
        assert self._session is not None, "start() first"
        try:
            async with self._session.get(self.url) as response:
                if response.status != 200:
                    raise ProbeError(f"HTTP {response.status}")
                data = await response.json(content_type=None)
        except asyncio.TimeoutError:
            raise ProbeError(f"no answer within {self.timeout.total}s") from None
        except aiohttp.ClientError as exc:
            raise ProbeError(f"{type(exc).__name__}: {exc}") from None
        except ValueError as exc:
            raise ProbeError(f"body is not JSON ({exc})") from None
        return AppStatus.parse(data)

    def _failed(self, message: str) -> None:
        if not self._failures:
            log.warning("app probe %s failed, tts_app_up=0 until it answers: %s", self.url,
                        message)
        self._failures += 1
        m = self.metrics
        with m.registry.lock:
            m.app_up.set((), 0.0)
            m.collector_errors.inc(("probe",))
            for family in (m.requests_waiting, m.requests_running, m.requests_capacity):
                family.remove(())
