"""GPU readings behind one small interface, and the collector that turns them into metrics and
feeds the ingress gate.

Sources (``gpu.source`` in the config):

- ``nvml``: :class:`NvmlSource`, the NVIDIA management library through ``pynvml``
  (nvidia-ml-py). The module is passed in, so tests hand it a fake one.
- ``file:PATH``: :class:`FileSource`, a JSON file re-read on every poll; what tests, demos and
  operators' drills drive.
- ``none``: :class:`NoneSource`, no GPUs (a CPU-only deployment).

Every failure of a source is a :class:`GpuError`. The collector never lets one escape: it sets
``tts_gpu_up 0``, counts ``tts_exporter_collector_errors_total{collector="gpu"}``, drops the
per-GPU series (a failed poll must not leave the last value looking fresh) and tells the gate.
What it exports on success::

    tts_gpu_up 1
    tts_gpu_info{gpu="0",uuid="GPU-8f…",name="NVIDIA H100 80GB HBM3"} 1
    tts_gpu_memory_used_bytes{gpu="0",uuid="GPU-8f…"} 7.2e10
    tts_gpu_memory_total_bytes{gpu="0",uuid="GPU-8f…"} 8.5e10
    tts_gpu_utilization_ratio{gpu="0",uuid="GPU-8f…"} 0.93
    tts_gpu_temperature_celsius{gpu="0",uuid="GPU-8f…"} 61
    tts_gpu_power_watts{gpu="0",uuid="GPU-8f…"} 412.5
    tts_gpu_process_memory_bytes{gpu="0",pid="4242",process="python3"} 7.1e10
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

from aiohttp import web

from exporter.metrics import SidecarMetrics

if TYPE_CHECKING:
    from exporter.gate import Gate

log = logging.getLogger("exporter.gpu")

T = TypeVar("T")


class GpuError(Exception):
    """A GPU poll that produced no trustworthy reading; the message says why, for the log."""


@dataclass(frozen=True)
class GpuProcess:
    """One process holding memory on one GPU."""

    pid: int
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one poll. Optional fields are None where the device does not report them."""

    index: int
    uuid: str
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def used_ratio(self) -> float:
        """Memory used over installed; what the gate compares with its thresholds."""
        return self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes else 1.0


class GpuSource(Protocol):
    """Where readings come from. ``read`` may block (NVML can), so it runs off the event loop."""

    def read(self) -> list[GpuReading]:
        """All GPUs now, or raise :class:`GpuError`."""
        ...

    def close(self) -> None:
        """Release what ``read`` acquired (e.g. NVML's handle on the driver)."""
        ...


class NoneSource:
    """No GPUs: a CPU-only deployment. Polls succeed with nothing, so the gate never closes for
    VRAM and ``tts_gpu_up`` stays 1 (nothing is failing)."""

    def read(self) -> list[GpuReading]:
        return []

    def close(self) -> None:
        pass


class FileSource:
    """GPUs described by a JSON file, re-read on every poll so a drill or test changes VRAM by
    rewriting it::

        {"gpus": [{"index": 0, "uuid": "GPU-0", "name": "drill", "memory_used_bytes": 9e9,
                   "memory_total_bytes": 1e10, "utilization_ratio": 0.5,
                   "temperature_celsius": 60, "power_watts": 200,
                   "processes": [{"pid": 42, "name": "python3", "memory_bytes": 9e9}]}]}

    Writers should replace the file atomically; a half-written file is a failed poll, not a
    reading.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[GpuReading]:
        try:
            data = json.loads(self.path.read_bytes())
        except OSError as exc:
            raise GpuError(f"{self.path}: cannot read the GPU file ({exc.strerror})") from None
        except ValueError as exc:
            raise GpuError(f"{self.path}: not valid JSON ({exc})") from None
        gpus = data.get("gpus") if isinstance(data, dict) else None
        if not isinstance(gpus, list):
            raise GpuError(f'{self.path}: expected an object with a "gpus" list')
        return [self._reading(i, gpu) for i, gpu in enumerate(gpus)]

    def _reading(self, i: int, gpu: Any) -> GpuReading:
        where = f"{self.path}: gpus[{i}]"
        if not isinstance(gpu, dict):
            raise GpuError(f"{where}: expected an object")

        def number(key: str, required: bool = False) -> float | None:
            value = gpu.get(key)
            if value is None and not required:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise GpuError(f"{where}.{key}: expected a number >= 0, got {value!r}")
            return float(value)

        used, total = number("memory_used_bytes", True), number("memory_total_bytes", True)
        assert used is not None and total is not None
        if total <= 0:
            raise GpuError(f"{where}.memory_total_bytes: expected a number > 0")
        processes = []
        for j, proc in enumerate(gpu.get("processes") or []):
            try:
                processes.append(GpuProcess(int(proc["pid"]), str(proc.get("name", "unknown")),
                                            int(proc["memory_bytes"])))
            except (TypeError, KeyError, ValueError):
                raise GpuError(f"{where}.processes[{j}]: expected pid and memory_bytes") from None
        return GpuReading(
            index=int(gpu.get("index", i)),
            uuid=str(gpu.get("uuid", f"file-{i}")),
            name=str(gpu.get("name", "file")),
            memory_used_bytes=int(used),
            memory_total_bytes=int(total),
            utilization_ratio=number("utilization_ratio"),
            temperature_celsius=number("temperature_celsius"),
            power_watts=number("power_watts"),
            processes=tuple(processes),
        )

    def close(self) -> None:
        pass


@dataclass
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str


class NvmlSource:
    """Readings from NVML through an injected ``pynvml`` module (``None`` when it failed to
    import, which then is a failure like any other).

    NVML is initialised lazily and once; device handles, uuids and names are cached because
    they are stable while NVML stays initialised. Any failing *required* call (device count,
    memory) tears the session down, so the next attempt re-initialises: that is how a reloaded
    driver or a GPU that came back is picked up. Re-initialisation backs off exponentially
    (``backoff_s`` doubling up to ``max_backoff_s``) because a missing library or driver fails
    the same way 4 times a second otherwise. Optional fields (utilisation, temperature, power,
    processes) that the device reports as NOT_SUPPORTED are left out; other errors on them are
    real failures, since they usually mean the GPU is gone.
    """

    def __init__(
        self,
        nvml: ModuleType | None,
        proc_root: str | Path = "/proc",
        clock: Callable[[], float] = time.monotonic,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.nvml = nvml
        self.proc_root = Path(proc_root)
        self.clock = clock
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._devices: list[_Device] | None = None
        self._memory_v2 = nvml is not None and hasattr(nvml, "nvmlMemory_v2")
        self._next_attempt = 0.0
        self._delay = 0.0
        self._last_error = ""

    @classmethod
    def from_import(cls, **kwargs: Any) -> NvmlSource:
        """The real ``pynvml``, or a source that reports it missing on every poll."""
        try:
            import pynvml
        except ImportError:
            return cls(None, **kwargs)
        return cls(pynvml, **kwargs)

    def read(self) -> list[GpuReading]:
        nvml = self.nvml
        if nvml is None:
            raise GpuError("NVML unavailable: pynvml (nvidia-ml-py) is not installed")
        devices = self._devices if self._devices is not None else self._init(nvml)
        try:
            return [self._read_device(nvml, device) for device in devices]
        except Exception as exc:  # NVMLError, or ctypes trouble from a driver going away
            self._fail(f"NVML call failed: {_describe(exc)}")

    def close(self) -> None:
        if self.nvml is not None and self._devices is not None:
            self._devices = None
            # A lost GPU or unloaded driver fails the shutdown too; nothing is left to release.
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()

    def _init(self, nvml: ModuleType) -> list[_Device]:
        now = self.clock()
        if now < self._next_attempt:
            raise GpuError(f"{self._last_error} (next NVML init in "
                           f"{self._next_attempt - now:.1f}s)")
        try:
            nvml.nvmlInit()
        except Exception as exc:
            self._fail(f"NVML init failed: {_describe(exc)}")
        try:
            devices = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                devices.append(_Device(index, handle, _text(nvml.nvmlDeviceGetUUID(handle)),
                                       _text(nvml.nvmlDeviceGetName(handle))))
        except Exception as exc:
            # nvmlInit counts references: undo this one, or every retry would leak another.
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
            self._fail(f"NVML init failed: {_describe(exc)}")
        self._devices = devices
        self._delay = 0.0
        return devices

    def _fail(self, message: str) -> NoReturn:
        """Forget the session, schedule the next init with backoff, raise GpuError."""
        self.close()
        self._delay = min(self.max_backoff_s, self._delay * 2 if self._delay else self.backoff_s)
        self._next_attempt = self.clock() + self._delay
        self._last_error = message
        raise GpuError(message)

    def _read_device(self, nvml: ModuleType, device: _Device) -> GpuReading:
        handle = device.handle
        used, total = self._memory(nvml, handle)
        util = self._optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        temp = self._optional(nvml, nvml.nvmlDeviceGetTemperature, handle,
                              nvml.NVML_TEMPERATURE_GPU)
        power_mw = self._optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
        return GpuReading(
            index=device.index,
            uuid=device.uuid,
            name=device.name,
            memory_used_bytes=int(used),
            memory_total_bytes=int(total),
            utilization_ratio=None if util is None else util.gpu / 100.0,
            temperature_celsius=None if temp is None else float(temp),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            processes=self._processes(nvml, handle),
        )

    def _memory(self, nvml: ModuleType, handle: Any) -> tuple[int, int]:
        # v2 reports "used" without the driver's reserved memory, as nvidia-smi does since R510;
        # v1 counts the reservation as used, which would read a few hundred MB high at idle.
        if self._memory_v2:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return int(info.used), int(info.total)
            except nvml.NVMLError as exc:
                if _code(exc) not in _codes(nvml, "NOT_SUPPORTED", "FUNCTION_NOT_FOUND",
                                            "ARGUMENT_VERSION_MISMATCH"):
                    raise
                self._memory_v2 = False
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)

    def _optional(self, nvml: ModuleType, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except nvml.NVMLError as exc:
            if _code(exc) in _codes(nvml, "NOT_SUPPORTED"):
                return None
            raise

    def _processes(self, nvml: ModuleType, handle: Any) -> tuple[GpuProcess, ...]:
        seen: dict[int, int] = {}
        for call in (nvml.nvmlDeviceGetComputeRunningProcesses,
                     nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in self._optional(nvml, call, handle) or ():
                memory = getattr(proc, "usedGpuMemory", None)
                if memory is not None:  # None: not available (e.g. in a container without pid)
                    seen[int(proc.pid)] = max(seen.get(int(proc.pid), 0), int(memory))
        return tuple(GpuProcess(pid, self._comm(pid), memory) for pid, memory in seen.items())

    def _comm(self, pid: int) -> str:
        # Best effort: the process may be in another pid namespace, or gone already.
        try:
            return (self.proc_root / str(pid) / "comm").read_text(encoding="utf-8").strip()
        except OSError:
            return "unknown"


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    """``NVMLError_GpuIsLost: GPU is lost``: the class names the case, str() may be empty."""
    return f"{type(exc).__name__}: {exc}"


def _code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None)


def _codes(nvml: ModuleType, *names: str) -> set[int]:
    return {getattr(nvml, f"NVML_ERROR_{name}") for name in names
            if hasattr(nvml, f"NVML_ERROR_{name}")}


def make_source(spec: str) -> GpuSource:
    """The source a ``gpu.source`` config value names (already validated by the config)."""
    if spec == "none":
        return NoneSource()
    if spec.startswith("file:"):
        return FileSource(spec[len("file:"):])
    return NvmlSource.from_import()


class _DaemonWorker:
    """Runs blocking calls one at a time on a daemon thread, handing results to the event loop.

    Not a ThreadPoolExecutor: its workers are joined at interpreter exit, so one read wedged in
    the driver would keep the sidecar from ever exiting on SIGTERM.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Any] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put((call, future))
        return future

    def close(self, last_call: Callable[[], Any] | None = None) -> None:
        """Run ``last_call`` after what is queued (result dropped), then end the thread."""
        if last_call is not None:
            self._calls.put((last_call, None))
        self._calls.put(None)

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            call, future = item
            try:
                result, error = call(), None
            except BaseException as exc:  # handed to the awaiting coroutine, not lost
                result, error = None, exc
            if future is None:
                continue
            # RuntimeError: the loop closed while the call ran, so nobody is waiting.
            with contextlib.suppress(RuntimeError):
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


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
    ) -> None:
        self.routes = []
        self.source = source
        self.metrics = metrics
        self.gate = gate
        self.poll_interval_s = poll_interval_s
        self.stale_after_s = stale_after_s
        self._worker = _DaemonWorker("gpu-poll")
        self._pending: asyncio.Future[list[GpuReading]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    async def start(self) -> None:
        with self.metrics.registry.lock:  # the error series exists at 0, so rate() works
            self.metrics.collector_errors.inc(("gpu",), 0.0)
        # One poll before the HTTP server listens, so the first /ingress answer is informed.
        started = asyncio.get_running_loop().time()
        await self.poll_once()
        self._task = asyncio.create_task(self._run(started), name="gpu-collector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # NVML shutdown on the poll thread, without waiting on a driver that may be wedged.
        self._worker.close(self.source.close)

    async def _run(self, started: float) -> None:
        """One call every ``poll_interval_s``, counted from the start of the previous one (``start``
        made the first)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self.poll_interval_s - (loop.time() - started)))
            started = loop.time()
            await self.poll_once()

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
            self._failed(str(exc))
            return
        except Exception as exc:  # a bug in a source must not stop the gate's input
            self._pending = None
            self._failed(f"GPU source raised {type(exc).__name__}: {exc}")
            return
        self._pending = None
        self._succeeded(readings)

    def _succeeded(self, readings: Sequence[GpuReading]) -> None:
        if self._failures:
            log.info("GPU readings recovered after %d failed polls", self._failures)
            self._failures = 0
        m = self.metrics
        with m.registry.lock:
            self._drop_series()
            m.gpu_up.set((), 1.0)
            for r in readings:
                gpu = str(r.index)
                key = (gpu, r.uuid)
                m.gpu_info.set((gpu, r.uuid, r.name), 1.0)
                m.gpu_memory_used.set(key, float(r.memory_used_bytes))
                m.gpu_memory_total.set(key, float(r.memory_total_bytes))
                for family, value in ((m.gpu_utilization, r.utilization_ratio),
                                      (m.gpu_temperature, r.temperature_celsius),
                                      (m.gpu_power, r.power_watts)):
                    if value is not None:
                        family.set(key, value)
                for proc in r.processes:
                    m.gpu_process_memory.set((gpu, str(proc.pid), proc.name),
                                             float(proc.memory_bytes))
        if self.gate is not None:
            self.gate.observe_gpus([r.used_ratio for r in readings])

    def _failed(self, message: str) -> None:
        if not self._failures:
            log.warning("GPU poll failed, tts_gpu_up=0 until it recovers: %s", message)
        self._failures += 1
        m = self.metrics
        with m.registry.lock:
            self._drop_series()
            m.gpu_up.set((), 0.0)
            m.collector_errors.inc(("gpu",))
        if self.gate is not None:
            self.gate.gpu_failed()

    def _drop_series(self) -> None:
        """Forget every per-GPU series: vanished GPUs and exited processes must disappear, and
        a failed poll must not leave the last values looking current."""
        m = self.metrics
        for family in (m.gpu_info, m.gpu_memory_used, m.gpu_memory_total, m.gpu_utilization,
                       m.gpu_temperature, m.gpu_power, m.gpu_process_memory):
            family.clear()
