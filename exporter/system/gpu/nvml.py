"""GPU readings from NVML (``gpu.source: nvml``) through an injected ``pynvml`` module.

The module is passed in, as prometheus_client's process collector takes its ``/proc`` root,
so tests hand it a fake covering events, unsupported calls and vanishing devices.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from exporter.system.gpu.readings import (
    CLOCK_EVENT_REASONS,
    GpuError,
    GpuProcess,
    GpuReading,
    RemappedRows,
    XidEvent,
)

log = logging.getLogger("exporter.gpu")

# Events taken from the driver's queue per poll; the rest wait for the next poll, so an event
# storm cannot hold the worker thread (and the gate's input) for long.
MAX_EVENTS_PER_POLL = 256

# nvmlEventTypeXidCriticalError (nvml.h); XID events are the only ones asked for.
XID_EVENT = 0x8

# Error codes meaning "this device or driver cannot do that": the signal is absent, not failing.
_UNSUPPORTED = ("NOT_SUPPORTED", "FUNCTION_NOT_FOUND")


@dataclass
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str
    mig_index: int | None = None
    unsupported: set[str] = field(default_factory=set)


class NvmlSource:
    """Readings from NVML (``None`` for the module when it failed to import, which then is a
    failure like any other).

    NVML is initialised lazily and once; device handles, uuids and names are cached because
    they are stable while NVML stays initialised. MIG instances of a GPU in MIG mode are read
    as devices of their own (memory and processes; the health signals belong to the GPU). Any
    failing *required* call (device count, memory) tears the session down, so the next attempt
    re-initialises: that is how a reloaded driver or a GPU that came back is picked up.
    Re-initialisation backs off exponentially (``backoff_s`` doubling up to ``max_backoff_s``)
    because a missing library or driver fails the same way 4 times a second otherwise.

    Optional signals (utilisation, temperature, power, processes, SM clock, ECC, remapped rows,
    clock-event reasons, XID events) that a device or driver does not support are logged once,
    never asked again for that device, and left out of its readings; other errors on them are
    real failures, since they usually mean the GPU is gone.

    XID errors arrive as NVML events. The event set is drained with a zero timeout on every
    read, on the poll thread, so waiting for events never delays a memory reading.
    """

    def __init__(
        self,
        nvml: ModuleType | None,
        proc_root: str | Path = "/proc",
        clock: Callable[[], float] = time.monotonic,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.nvml = nvml
        self.proc_root = Path(proc_root)
        self.clock, self.wall_clock = clock, wall_clock
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._devices: list[_Device] | None = None
        self._events: Any = None
        self._memory_v2 = nvml is not None and hasattr(nvml, "nvmlMemory_v2")
        self._next_attempt = 0.0
        self._delay = 0.0
        self._last_error = ""
        self._noted: set[tuple[str, str]] = set()

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
        xids: list[XidEvent] = []
        try:
            self._drain_events(nvml, devices, xids)
            return [self._read_device(nvml, device,
                                      tuple(e for e in xids if e.uuid == device.uuid))
                    for device in devices]
        except Exception as exc:  # NVMLError, or ctypes trouble from a driver going away
            self._fail(f"NVML call failed: {_describe(exc)}", tuple(xids))

    def close(self) -> None:
        if self.nvml is not None and self._devices is not None:
            self._devices = None
            self._free_events()
            # A lost GPU or unloaded driver fails the shutdown too; nothing is left to release.
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()

    def _free_events(self) -> None:
        if self._events is not None and self.nvml is not None:
            with contextlib.suppress(Exception):  # as for the shutdown
                self.nvml.nvmlEventSetFree(self._events)
        self._events = None

    # --- Session ----------------------------------------------------------------------------

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
                device = _Device(index, handle, _text(nvml.nvmlDeviceGetUUID(handle)),
                                 _text(nvml.nvmlDeviceGetName(handle)))
                devices.append(device)
                devices += self._mig_devices(nvml, device)
            self._register_events(nvml, devices)
        except Exception as exc:
            # nvmlInit counts references: undo this one, or every retry would leak another.
            self._free_events()
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
            self._fail(f"NVML init failed: {_describe(exc)}")
        self._devices = devices
        self._delay = 0.0
        return devices

    def _mig_devices(self, nvml: ModuleType, parent: _Device) -> list[_Device]:
        get_mode = _find(nvml, "nvmlDeviceGetMigMode")
        try:
            mode = get_mode(parent.handle) if get_mode is not None else None
        except nvml.NVMLError as exc:  # most GPUs have no MIG: nothing to note
            if _code(exc) not in _codes(nvml, *_UNSUPPORTED):
                raise
            return []
        if mode is None or mode[0] != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return []
        found = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(parent.handle)):
            try:
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent.handle, slot)
            except nvml.NVMLError as exc:
                if _code(exc) in _codes(nvml, "NOT_FOUND"):  # an empty slot
                    continue
                raise
            found.append(_Device(parent.index, handle, _text(nvml.nvmlDeviceGetUUID(handle)),
                                 f"{parent.name} MIG", mig_index=slot))
        return found

    def _register_events(self, nvml: ModuleType, devices: list[_Device]) -> None:
        """Ask for XID events on every GPU that supports them (MIG instances report theirs
        through the GPU)."""
        physical = [d for d in devices if d.mig_index is None]
        if not physical:
            return
        create = _find(nvml, "nvmlEventSetCreate")
        error = None
        try:
            self._events = create() if create is not None else None
        except nvml.NVMLError as exc:
            if _code(exc) not in _codes(nvml, *_UNSUPPORTED):
                raise
            error = exc
        if self._events is None:
            for device in physical:
                self._unsupported(device, "xid", error)
            return
        for device in physical:
            self._optional(nvml, device, "xid", _find(nvml, "nvmlDeviceRegisterEvents"),
                           device.handle, XID_EVENT, self._events)
        if all("xid" in device.unsupported for device in physical):
            self._free_events()  # nothing registered: no need to ask for events each poll

    def _fail(self, message: str, xid_events: tuple[XidEvent, ...] = ()) -> NoReturn:
        """Forget the session, schedule the next init with backoff, raise GpuError."""
        self.close()
        self._delay = min(self.max_backoff_s, self._delay * 2 if self._delay else self.backoff_s)
        self._next_attempt = self.clock() + self._delay
        self._last_error = message
        raise GpuError(message, xid_events)

    # --- Reading ----------------------------------------------------------------------------

    def _drain_events(self, nvml: ModuleType, devices: list[_Device],
                      into: list[XidEvent]) -> None:
        """Append the XID events queued since the last read to ``into``; never waits."""
        if self._events is None:
            return
        wait = _find(nvml, "nvmlEventSetWait_v2", "nvmlEventSetWait")
        if wait is None:
            return
        labels = {d.uuid: str(d.index) for d in devices if d.mig_index is None}
        for _ in range(MAX_EVENTS_PER_POLL):
            try:
                event = wait(self._events, 0)
            except nvml.NVMLError as exc:
                if _code(exc) in _codes(nvml, "TIMEOUT"):  # the queue is empty
                    break
                raise
            if event.eventType & XID_EVENT:
                uuid = _text(nvml.nvmlDeviceGetUUID(event.device))
                into.append(XidEvent(labels.get(uuid, "unknown"), uuid, int(event.eventData),
                                     self.wall_clock()))

    def _read_device(self, nvml: ModuleType, device: _Device,
                     xids: tuple[XidEvent, ...]) -> GpuReading:
        handle = device.handle
        used, total = self._memory(nvml, handle)
        processes = self._processes(nvml, device)
        if device.mig_index is not None:
            return GpuReading(index=device.index, uuid=device.uuid, name=device.name,
                              memory_used_bytes=used, memory_total_bytes=total,
                              processes=processes, mig_index=device.mig_index,
                              unsupported=frozenset(device.unsupported))

        def optional(signal: str, names: tuple[str, ...], *args: Any) -> Any:
            return self._optional(nvml, device, signal, _find(nvml, *names), handle, *args)

        util = optional("utilization", ("nvmlDeviceGetUtilizationRates",))
        temp = optional("temperature", ("nvmlDeviceGetTemperature",), nvml.NVML_TEMPERATURE_GPU)
        power_mw = optional("power", ("nvmlDeviceGetPowerUsage",))
        sm_mhz = optional("sm_clock", ("nvmlDeviceGetClockInfo",), 1)  # NVML_CLOCK_SM
        # NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC (since the driver loaded)
        ecc = optional("ecc", ("nvmlDeviceGetTotalEccErrors",), 1, 0)
        rows = optional("remapped_rows", ("nvmlDeviceGetRemappedRows",))
        # Renamed from "throttle" to "clock event" reasons in newer NVML; same bits.
        reasons = optional("clock_events", ("nvmlDeviceGetCurrentClocksEventReasons",
                                            "nvmlDeviceGetCurrentClocksThrottleReasons"))
        return GpuReading(
            index=device.index,
            uuid=device.uuid,
            name=device.name,
            memory_used_bytes=used,
            memory_total_bytes=total,
            utilization_ratio=None if util is None else util.gpu / 100.0,
            temperature_celsius=None if temp is None else float(temp),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            processes=processes,
            sm_clock_hertz=None if sm_mhz is None else float(sm_mhz) * 1e6,
            ecc_uncorrected_errors=None if ecc is None else int(ecc),
            remapped_rows=None if rows is None else RemappedRows(
                int(rows[0]), int(rows[1]), bool(rows[2]), bool(rows[3])),
            clock_events=None if reasons is None else frozenset(
                name for bit, name in CLOCK_EVENT_REASONS.items() if int(reasons) & bit),
            xid_events=xids,
            unsupported=frozenset(device.unsupported),
        )

    def _memory(self, nvml: ModuleType, handle: Any) -> tuple[int, int]:
        # v2 reports "used" without the driver's reserved memory, as nvidia-smi does since R510;
        # v1 counts the reservation as used, which would read a few hundred MB high at idle.
        if self._memory_v2:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return int(info.used), int(info.total)
            except nvml.NVMLError as exc:
                if _code(exc) not in _codes(nvml, *_UNSUPPORTED, "ARGUMENT_VERSION_MISMATCH"):
                    raise
                self._memory_v2 = False
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)

    def _optional(self, nvml: ModuleType, device: _Device, signal: str,
                  call: Callable[..., Any] | None, *args: Any) -> Any:
        """``call(*args)``, or None once the device has shown it does not support ``signal``
        (then it is not asked again: an unsupported call every poll is an error storm)."""
        if signal in device.unsupported:
            return None
        if call is None:  # a pynvml too old to have the call
            self._unsupported(device, signal, None)
            return None
        try:
            return call(*args)
        except nvml.NVMLError as exc:
            if _code(exc) in _codes(nvml, *_UNSUPPORTED):
                self._unsupported(device, signal, exc)
                return None
            raise

    def _unsupported(self, device: _Device, signal: str, exc: BaseException | None) -> None:
        device.unsupported.add(signal)
        if (device.uuid, signal) not in self._noted:  # once per sidecar, re-inits included
            self._noted.add((device.uuid, signal))
            log.info("GPU %s (%s): %s not supported (%s); its series stay absent", device.index,
                     device.uuid, signal, _describe(exc) if exc else "pynvml lacks the call")

    def _processes(self, nvml: ModuleType, device: _Device) -> tuple[GpuProcess, ...]:
        seen: dict[int, int] = {}
        for signal in ("compute_processes", "graphics_processes"):
            call = _find(nvml, f"nvmlDeviceGet{signal.split('_')[0].title()}RunningProcesses")
            for proc in self._optional(nvml, device, signal, call, device.handle) or ():
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


def _find(nvml: ModuleType, *names: str) -> Callable[..., Any] | None:
    """The first of ``names`` this pynvml has (older ones lack newer calls)."""
    return next((getattr(nvml, n) for n in names if hasattr(nvml, n)), None)


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
