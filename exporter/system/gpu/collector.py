"""The GPU collector: polls a source off the event loop, keeps the GPUs this pod follows,
publishes them and feeds the ingress gate.

What it exports on success, per followed GPU (MIG instances: memory and processes only;
optional series are absent where the device does not support them)::

    tts_gpu_up 1
    tts_gpu_watch_mode{configured="auto",mode="app"} 1
    tts_gpu_info{gpu="0",uuid="GPU-8f…",name="NVIDIA H100 80GB HBM3"} 1
    tts_gpu_memory_used_bytes{gpu="0",uuid="GPU-8f…"} 7.2e10
    tts_gpu_memory_total_bytes{gpu="0",uuid="GPU-8f…"} 8.5e10
    tts_gpu_utilization_ratio{gpu="0",uuid="GPU-8f…"} 0.93
    tts_gpu_temperature_celsius{gpu="0",uuid="GPU-8f…"} 61
    tts_gpu_power_watts{gpu="0",uuid="GPU-8f…"} 412.5
    tts_gpu_process_memory_bytes{gpu="0",pid="4242",process="python3"} 7.1e10
    tts_gpu_sm_clock_hertz{gpu="0",uuid="GPU-8f…"} 1.98e9
    tts_gpu_ecc_uncorrected_errors_total{gpu="0",uuid="GPU-8f…"} 0
    tts_gpu_remapped_rows{gpu="0",uuid="GPU-8f…",cause="uncorrectable"} 0
    tts_gpu_row_remap_pending{gpu="0",uuid="GPU-8f…"} 0
    tts_gpu_row_remap_failed{gpu="0",uuid="GPU-8f…"} 0
    tts_gpu_clock_event_active{gpu="0",uuid="GPU-8f…",reason="hw_thermal_slowdown"} 0
    tts_gpu_xid_errors_total{gpu="0",uuid="GPU-8f…",xid="79"} 1
    tts_gpu_xid_last_event_timestamp_seconds{gpu="0",uuid="GPU-8f…",xid="79"} 1.7e9

A failed poll (the source raised, went stale, or a followed GPU is missing) sets
``tts_gpu_up 0``, counts ``tts_exporter_collector_errors_total{collector="gpu"}``, drops the
per-GPU gauges (a failed poll must not leave the last value looking fresh) and tells the gate.
The XID series stay: they count events, which a later failure does not undo.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from exporter.metrics import SidecarMetrics
from exporter.system.gpu.devices import DeviceWatch
from exporter.system.gpu.readings import (
    CLOCK_EVENT_REASONS,
    GpuError,
    GpuReading,
    GpuSource,
    XidEvent,
)
from exporter.system.gpu.worker import DaemonWorker
from exporter.system.periodic import every

if TYPE_CHECKING:
    from exporter.gate import Gate
    from exporter.system.probe import AppStatus

log = logging.getLogger("exporter.gpu")

# XID codes the driver documents are below 1000; anything else folds into one series.
MAX_XID = 999


class GpuCollector:
    """Polls a :class:`GpuSource` every ``poll_interval_s`` and publishes each result at once,
    to the metrics and to the gate, so a crossing reaches ``/ingress`` within one poll.

    Reads run on one dedicated daemon thread because NVML calls block (for seconds when a GPU
    falls off the bus, forever when the driver wedges). A read still running after
    ``stale_after_s`` counts as a failure; the next poll waits on that same read rather than
    piling another one onto a wedged driver.
    """

    routes: list[web.RouteDef]

    def __init__(
        self,
        source: GpuSource,
        metrics: SidecarMetrics,
        gate: Gate | None = None,
        poll_interval_s: float = 0.25,
        stale_after_s: float = 2.0,
        watch: DeviceWatch | None = None,
    ) -> None:
        self.routes = []
        self.source = source
        self.metrics = metrics
        self.gate = gate
        self.poll_interval_s = poll_interval_s
        self.stale_after_s = stale_after_s
        self.watch = watch or DeviceWatch("all")
        self._worker = DaemonWorker("gpu-poll")
        self._pending: asyncio.Future[list[GpuReading]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._publish_mode()

    async def start(self) -> None:
        self.metrics.count_error("gpu", 0.0)
        log.info("GPU watch (gpu.devices: %s): following %s", self.watch.configured,
                 self.watch.describe())
        # One poll before the HTTP server listens, so the first /ingress answer is informed.
        started = asyncio.get_running_loop().time()
        await self.poll_once()
        self._task = asyncio.create_task(every(self.poll_interval_s, self.poll_once, started),
                                         name="gpu-collector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # NVML shutdown on the poll thread, without waiting on a driver that may be wedged.
        self._worker.close(self.source.close)

    def on_app_status(self, status: AppStatus) -> None:
        """The CUDA devices the app reports (``gpu.devices: auto``), applied from the next
        poll on. An answer without ``gpu_devices`` says nothing about them."""
        if status.gpu_devices is None:
            return
        if self.watch.follow_app([d.uuid for d in status.gpu_devices], status.ready):
            log.info("GPU watch (gpu.devices: auto): now following %s",
                        self.watch.describe())
            self._publish_mode()

    async def poll_once(self) -> None:
        """One poll: read (bounded by ``stale_after_s``), publish, feed the gate."""
        if self._pending is None:
            self._pending = self._worker.submit(self.source.read)
        try:
            readings = await asyncio.wait_for(asyncio.shield(self._pending), self.stale_after_s)
        except (asyncio.TimeoutError, TimeoutError):
            self._failed(f"GPU read still running after {self.stale_after_s}s (stale)")
            return
        except GpuError as exc:
            self._pending = None
            self._count_xids(e for e in exc.xid_events if self.watch.follows(e.uuid, e.gpu))
            self._failed(str(exc))
            return
        except Exception as exc:  # a bug in a source must not stop the gate's input
            self._pending = None
            self._failed(f"GPU source raised {type(exc).__name__}: {exc}")
            return
        self._pending = None
        try:
            followed = self.watch.select(readings)
        except GpuError as exc:
            self._count_xids(e for r in readings for e in r.xid_events
                             if self.watch.follows(e.uuid, e.gpu))
            self._failed(str(exc))
            return
        self._count_xids(e for r in followed for e in r.xid_events)
        self._succeeded(followed)

    def _publish_mode(self) -> None:
        m = self.metrics
        with m.updating():
            m.gpu_watch_mode.clear()
            m.gpu_watch_mode.set((self.watch.configured, self.watch.mode), 1.0)

    def _succeeded(self, readings: Sequence[GpuReading]) -> None:
        if self._failures:
            log.info("GPU readings recovered after %d failed polls", self._failures)
            self._failures = 0
        m = self.metrics
        with m.updating():
            self._drop_series()
            m.gpu_up.set((), 1.0)
            for r in readings:
                self._publish(r)
        if self.gate is not None:
            self.gate.observe_gpus([r.used_ratio for r in readings])

    def _publish(self, r: GpuReading) -> None:
        m = self.metrics
        gpu = r.label
        key = (gpu, r.uuid)
        m.gpu_info.set((gpu, r.uuid, r.name), 1.0)
        m.gpu_memory_used.set(key, float(r.memory_used_bytes))
        m.gpu_memory_total.set(key, float(r.memory_total_bytes))
        for family, value in ((m.gpu_utilization, r.utilization_ratio),
                              (m.gpu_temperature, r.temperature_celsius),
                              (m.gpu_power, r.power_watts),
                              (m.gpu_sm_clock, r.sm_clock_hertz)):
            if value is not None:
                family.set(key, value)
        for proc in r.processes:
            m.gpu_process_memory.set((gpu, str(proc.pid), proc.name), float(proc.memory_bytes))
        if r.ecc_uncorrected_errors is not None:
            # NVML's own count (volatile: since the driver loaded); a reload resets it, which
            # Prometheus reads as a counter reset.
            m.gpu_ecc_uncorrected.values[key] = float(r.ecc_uncorrected_errors)
        if r.remapped_rows is not None:
            rows = r.remapped_rows
            m.gpu_remapped_rows.set((*key, "correctable"), float(rows.correctable))
            m.gpu_remapped_rows.set((*key, "uncorrectable"), float(rows.uncorrectable))
            m.gpu_row_remap_pending.set(key, float(rows.pending))
            m.gpu_row_remap_failed.set(key, float(rows.failed))
        if r.clock_events is not None:
            for reason in CLOCK_EVENT_REASONS.values():
                m.gpu_clock_event_active.set((*key, reason), float(reason in r.clock_events))

    def _count_xids(self, events: Iterable[XidEvent]) -> None:
        m = self.metrics
        with m.updating():
            for event in events:
                xid = str(event.xid) if 0 <= event.xid <= MAX_XID else "other"
                labels = (event.gpu, event.uuid, xid)
                m.gpu_xid_errors.inc(labels)
                m.gpu_xid_last_event.set(labels, event.timestamp)

    def _failed(self, message: str) -> None:
        if not self._failures:
            log.warning("GPU poll failed, tts_gpu_up=0 until it recovers: %s", message)
        self._failures += 1
        m = self.metrics
        with m.updating():
            self._drop_series()
            m.gpu_up.set((), 0.0)
            m.collector_errors.inc(("gpu",))
        if self.gate is not None:
            self.gate.gpu_failed()

    def _drop_series(self) -> None:
        """Forget every per-GPU reading: vanished GPUs and exited processes must disappear,
        and a failed poll must not leave the last values looking current."""
        m = self.metrics
        for family in (m.gpu_info, m.gpu_memory_used, m.gpu_memory_total, m.gpu_utilization,
                       m.gpu_temperature, m.gpu_power, m.gpu_process_memory, m.gpu_sm_clock,
                       m.gpu_remapped_rows, m.gpu_row_remap_pending, m.gpu_row_remap_failed,
                       m.gpu_clock_event_active):
            family.clear()
        m.gpu_ecc_uncorrected.values.clear()
