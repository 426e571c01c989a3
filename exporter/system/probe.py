"""App probe: polls the TTS app's ``/status`` for what logs cannot tell — the queue right now,
and whether the process is up and the same one as before.

The contract (what the co-packaged app serves; any service answering it can be watched)::

    {"waiting": 3, "running": 2, "capacity": 64, "started_at": 1718200000.5, "pid": 4242,
     "backend": "chattts", "model_version": "0.2.5", "ready": true, "log_write_errors": 0,
     "instances_healthy": 2, "instances_hung": 0,
     "gpu_devices": [{"index": 0, "uuid": "GPU-8f3a…", "memory_allocated_bytes": 2.1e9,
                      "memory_reserved_bytes": 3.0e9, "gpu_oom_total": 0}]}

Output::

    tts_app_up 1
    tts_requests_waiting 3
    tts_requests_running 2
    tts_requests_capacity 64
    tts_app_restarts_total 1     # a different (started_at, pid) than the last answer
    tts_app_gpu_memory_allocated_bytes{device="0",uuid="GPU-8f3a…"} 2.1e9
    tts_app_gpu_memory_reserved_bytes{device="0",uuid="GPU-8f3a…"} 3.0e9
    tts_app_gpu_oom_total{device="0",uuid="GPU-8f3a…"} 0
    tts_app_log_write_errors_total 7
    tts_app_instances{state="healthy"} 2
    tts_app_instances{state="hung"} 0
    tts_app_store_up 1                   # from "store": {"kind", "healthy", "fallbacks_total"}
    tts_app_store_fallbacks_total 0

``pid``, ``ready`` and ``gpu_devices`` are optional: a new ``started_at`` alone is a restart;
``gpu_devices`` lists the CUDA devices the app holds (an empty list: none, e.g. the espeak
backend; absent: the app does not say), which ``gpu.devices: auto`` follows. Its memory fields
are optional per device (absent: that series is). ``log_write_errors`` is optional too
(log records the app could not write, cumulative since it started; >= 0), and so are
``instances_healthy`` and ``instances_hung`` (model instances in service, and those a
synthesis past its time limit still holds).
(log records the app could not write, cumulative since it started; >= 0). ``store`` is
optional: where jobs, keys and the cache are shared (``kind``), whether that store answers
(``healthy``) and the calls that fell back to local state since the app started.

On a failed probe (refused, timeout, non-200, not the contract) ``tts_app_up`` is 0 and the
queue and app GPU gauges disappear: the last queue depth of a dead process is not a fact any
more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any

import aiohttp
from aiohttp import web
from msgspec import Meta

from exporter.metrics import SidecarMetrics
from exporter.schema import Amount, Finite, ForeignSchema, InvalidInput, validate
from exporter.system.periodic import every

log = logging.getLogger("exporter.probe")


class ProbeError(Exception):
    """The app did not answer ``/status`` with the contract; the message says how."""


# Bounds on what one answer may list: a GPU node has at most a few dozen devices.
MAX_APP_GPU_DEVICES = 64
MAX_DEVICE_INDEX = 1023      # a CUDA ordinal; it becomes a label, so it is bounded too
MAX_UUID_CHARS = 128

# A count the app reports; bounded so that it stays exact as a float sample.
Count = Annotated[int, Meta(ge=0, le=2**53)]


class AppGpu(ForeignSchema, frozen=True):
    """One CUDA device the app holds, with PyTorch's view of its memory where reported."""

    index: Annotated[int, Meta(ge=0, le=MAX_DEVICE_INDEX)]
    uuid: Annotated[str, Meta(min_length=1, max_length=MAX_UUID_CHARS)]
    memory_allocated_bytes: Amount | None = None
    memory_reserved_bytes: Amount | None = None
    gpu_oom_total: Amount | None = None


class AppStore(ForeignSchema, frozen=True):
    """The app's shared store (``/status`` ``store``): answering, and fallbacks so far."""

    healthy: bool
    fallbacks_total: Count


class AppStatus(ForeignSchema, frozen=True):
    """The part of ``/status`` the sidecar uses (an optional field is one line here)."""

    waiting: Count
    running: Count
    capacity: Count
    started_at: Finite
    pid: Count | None = None
    ready: bool = True
    gpu_devices: Annotated[tuple[AppGpu, ...], Meta(max_length=MAX_APP_GPU_DEVICES)] | None = None
    log_write_errors: Count | None = None
    instances_healthy: Count | None = None
    instances_hung: Count | None = None
    store: AppStore | None = None
    queue_size: Count | None = None
    queue_limit: Count | None = None

    @classmethod
    def parse(cls, data: Any) -> AppStatus:
        """The answer as an AppStatus; a device without ``index`` is the one at its position
        in the list."""
        devices = data.get("gpu_devices") if isinstance(data, dict) else None
        if isinstance(devices, list):
            data = {**data, "gpu_devices": [{"index": i, **d} if isinstance(d, dict) else d
                                            for i, d in enumerate(devices)]}
        try:
            return validate(cls, data)
        except InvalidInput as exc:
            raise ProbeError(str(exc)) from None


class AppProbe:
    """The probe component: one GET every ``interval_s``, bounded by ``timeout_s``."""

    routes: list[web.RouteDef]

    def __init__(self, url: str, metrics: SidecarMetrics, interval_s: float = 1.0,
                 timeout_s: float = 1.0,
                 on_status: Callable[[AppStatus], None] | None = None) -> None:
        """``on_status`` gets every answer that fits the contract (the GPU collector follows
        the app's devices through it)."""
        self.routes = []
        self.on_status = on_status
        self.url = url
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._identity: tuple[float, int | None] | None = None
        self._failures = 0

    async def start(self) -> None:
        self.metrics.count_error("probe", 0.0)
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        started = asyncio.get_running_loop().time()
        await self.probe_once()
        self._task = asyncio.create_task(every(self.interval_s, self.probe_once, started),
                                         name="app-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

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
        with m.updating():
            m.app_up.set((), 1.0)
            m.requests_waiting.set((), float(status.waiting))
            m.requests_running.set((), float(status.running))
            m.requests_capacity.set((), float(status.capacity))
            for family, value in ((m.queue_size, status.queue_size),
                                  (m.queue_limit, status.queue_limit)):
                if value is None:
                    family.remove(())
                else:
                    family.set((), float(value))
            if restarted:
                m.app_restarts.inc()
            if status.log_write_errors is not None:
                # The app's own count since it started; its restart is a counter reset.
                m.app_log_write_errors.values[()] = float(status.log_write_errors)
            for state, count in (("healthy", status.instances_healthy),
                                 ("hung", status.instances_hung)):
                if count is not None:
                    m.app_instances.set((state,), float(count))
            self._publish_gpus(status.gpu_devices or ())
            if status.store is not None:
                m.app_store_up.set((), 1.0 if status.store.healthy else 0.0)
                # the app's own count since it started; its restart is a counter reset
                m.app_store_fallbacks.values[()] = float(status.store.fallbacks_total)
        if self.on_status is not None:
            self.on_status(status)

    def _publish_gpus(self, devices: tuple[AppGpu, ...]) -> None:
        """The app's GPU memory as PyTorch sees it (call under ``metrics.updating()``)."""
        m = self.metrics
        self._drop_gpu_series()
        for device in devices:
            key = (str(device.index), device.uuid)
            if device.memory_allocated_bytes is not None:
                m.app_gpu_allocated.set(key, device.memory_allocated_bytes)
            if device.memory_reserved_bytes is not None:
                m.app_gpu_reserved.set(key, device.memory_reserved_bytes)
            if device.gpu_oom_total is not None:
                # The app's own count since it started; its restart is a counter reset.
                m.app_gpu_oom.values[key] = device.gpu_oom_total

    def _drop_gpu_series(self) -> None:
        m = self.metrics
        m.app_gpu_allocated.clear()
        m.app_gpu_reserved.clear()
        m.app_gpu_oom.values.clear()

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
        with m.updating():
            m.app_up.set((), 0.0)
            m.collector_errors.inc(("probe",))
            for family in (m.requests_waiting, m.requests_running, m.requests_capacity,
                           m.app_store_up, m.queue_size, m.queue_limit):
                family.remove(())
            m.app_instances.clear()
            self._drop_gpu_series()
