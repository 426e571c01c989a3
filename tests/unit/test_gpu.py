"""GPU sources and the collector: every NVML failure mode through an injected fake ``pynvml``
module, the ``file:`` source on real files (a FIFO for a read that hangs), and the collector
feeding the gate."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.gate import Gate
from exporter.metrics import SidecarMetrics
from exporter.system.gpu import (
    DeviceWatch,
    FileSource,
    GpuCollector,
    GpuError,
    GpuReading,
    NoneSource,
    NvmlSource,
    canonical_uuid,
    make_source,
)
from tests.conftest import FakeClock

GIB = 1 << 30

# pynvml's error codes (nvml.h); the fake module exposes them under the same names.
CODES = {"UNINITIALIZED": 1, "NOT_SUPPORTED": 3, "NOT_FOUND": 6, "DRIVER_NOT_LOADED": 9,
         "TIMEOUT": 10, "LIBRARY_NOT_FOUND": 12, "FUNCTION_NOT_FOUND": 13, "GPU_IS_LOST": 15,
         "UNKNOWN": 999}
XID_EVENT = 8  # nvmlEventTypeXidCriticalError


class FakeNvml:
    """Builds a module with pynvml's surface over a list of fake GPUs.

    ``fail[name] = code`` makes the call ``name`` raise ``NVMLError(code)``, as pynvml does
    (an ``NVMLError_<Name>`` subclass carrying ``value``).
    """

    def __init__(self, gpus: int = 1, memory_v2: bool = True) -> None:
        self.gpus = [self.gpu(f"GPU-{i:04d}", (10 + i) * GIB) for i in range(gpus)]
        self.fail: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.events: list[types.SimpleNamespace] = []  # the driver's queue of XID events
        self.event_waits: list[int] = []  # the timeout of every nvmlEventSetWait call
        module = types.ModuleType("pynvml")
        self.module = module

        class NVMLError(Exception):
            def __init__(self, value: int) -> None:
                super().__init__(value)
                self.value = value

            def __str__(self) -> str:
                return {v: k for k, v in CODES.items()}.get(self.value, "?").replace("_", " ")

        self.errors = {code: type(f"NVMLError_{name.title().replace('_', '')}", (NVMLError,), {})
                       for name, code in CODES.items()}
        module.NVMLError = NVMLError  # type: ignore[attr-defined]
        for name, code in CODES.items():
            setattr(module, f"NVML_ERROR_{name}", code)
        module.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
        if memory_v2:
            module.nvmlMemory_v2 = 0x02000028  # type: ignore[attr-defined]
        for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount",
                     "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName",
                     "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates",
                     "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
                     "nvmlDeviceGetComputeRunningProcesses",
                     "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetMigMode",
                     "nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex",
                     "nvmlDeviceGetClockInfo", "nvmlDeviceGetTotalEccErrors",
                     "nvmlDeviceGetRemappedRows", "nvmlDeviceGetCurrentClocksEventReasons",
                     "nvmlEventSetCreate", "nvmlDeviceRegisterEvents", "nvmlEventSetWait_v2",
                     "nvmlEventSetFree"):
            setattr(module, name, self._wrap(name, getattr(self, "_" + name)))

    @staticmethod
    def gpu(uuid: str, used: int, total: int = 80 * GIB) -> dict[str, Any]:
        return {"uuid": uuid, "name": "Fake H100", "used": used, "total": total, "util": 42,
                "temp": 61, "power_mw": 412_500, "compute": [(4242, 9 * GIB)],
                "graphics": [(4242, 1 * GIB)], "sm_mhz": 1980, "ecc": 0,
                "rows": (2, 1, 0, 0), "reasons": 0x40 | 0x1, "mig": []}

    def push_xid(self, index: int, xid: int) -> None:
        self.events.append(types.SimpleNamespace(device=self.gpus[index], eventType=XID_EVENT,
                                                 eventData=xid))

    def _wrap(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.fail:
                raise self.errors[self.fail[name]](self.fail[name])
            return call(*args, **kwargs)
        return wrapped

    def count(self, name: str) -> int:
        return self.calls.get(name, 0)

    def _nvmlInit(self) -> None:
        pass

    def _nvmlShutdown(self) -> None:
        pass

    def _nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def _nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.gpus[index]

    def _nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:
        return str(handle["uuid"])

    def _nvmlDeviceGetName(self, handle: dict[str, Any]) -> bytes:
        return str(handle["name"]).encode()  # older pynvml returns bytes

    def _nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any], version: int | None = None) \
            -> types.SimpleNamespace:
        # v1 counts the driver's reservation as used: 512 MiB more, as real drivers do.
        reserved = 0 if version else 512 << 20
        return types.SimpleNamespace(used=handle["used"] + reserved, total=handle["total"])

    def _nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=handle["util"], memory=10)

    def _nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        assert sensor == 0
        return int(handle["temp"])

    def _nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        return int(handle["power_mw"])

    def _nvmlDeviceGetComputeRunningProcesses(self, handle: dict[str, Any]) \
            -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in handle["compute"]]

    def _nvmlDeviceGetGraphicsRunningProcesses(self, handle: dict[str, Any]) \
            -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in handle["graphics"]]

    def _error(self, name: str) -> Exception:
        return self.errors[CODES[name]](CODES[name])

    def _nvmlDeviceGetMigMode(self, handle: dict[str, Any]) -> tuple[int, int]:
        if "mig" not in handle:  # a MIG instance itself
            raise self._error("NOT_SUPPORTED")
        return (1, 1) if handle["mig"] else (0, 0)

    def _nvmlDeviceGetMaxMigDeviceCount(self, handle: dict[str, Any]) -> int:
        return 7

    def _nvmlDeviceGetMigDeviceHandleByIndex(self, handle: dict[str, Any], slot: int) \
            -> dict[str, Any]:
        if slot >= len(handle["mig"]) or handle["mig"][slot] is None:
            raise self._error("NOT_FOUND")
        return dict(handle["mig"][slot])

    def _nvmlDeviceGetClockInfo(self, handle: dict[str, Any], clock: int) -> int:
        assert clock == 1  # NVML_CLOCK_SM
        return int(handle["sm_mhz"])

    def _nvmlDeviceGetTotalEccErrors(self, handle: dict[str, Any], kind: int, counter: int) \
            -> int:
        assert (kind, counter) == (1, 0)  # uncorrected, volatile
        return int(handle["ecc"])

    def _nvmlDeviceGetRemappedRows(self, handle: dict[str, Any]) -> tuple[int, int, int, int]:
        return tuple(handle["rows"])

    def _nvmlDeviceGetCurrentClocksEventReasons(self, handle: dict[str, Any]) -> int:
        return int(handle["reasons"])

    def _nvmlEventSetCreate(self) -> str:
        return "event-set"

    def _nvmlDeviceRegisterEvents(self, handle: dict[str, Any], kinds: int, event_set: str) \
            -> None:
        assert kinds == XID_EVENT
        assert event_set == "event-set"

    def _nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> types.SimpleNamespace:
        self.event_waits.append(timeout_ms)
        if not self.events:
            raise self._error("TIMEOUT")
        return self.events.pop(0)

    def _nvmlEventSetFree(self, event_set: str) -> None:
        pass


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    """A fake /proc with one process, so process names resolve without touching the host's."""
    root = tmp_path / "proc"
    (root / "4242").mkdir(parents=True)
    (root / "4242" / "comm").write_text("python3\n")
    return root


def nvml_source(fake: FakeNvml, proc_root: Path, clock: FakeClock | None = None) -> NvmlSource:
    return NvmlSource(fake.module, proc_root=proc_root, clock=clock or FakeClock(100.0),
                      backoff_s=1.0, max_backoff_s=4.0)


# --- NvmlSource ------------------------------------------------------------------------------


def test_nvml_reads_memory_utilisation_temperature_power_and_processes(proc_root: Path) -> None:
    fake = FakeNvml(gpus=2)
    readings = nvml_source(fake, proc_root).read()
    assert [r.index for r in readings] == [0, 1]
    first = readings[0]
    assert (first.uuid, first.name) == ("GPU-0000", "Fake H100")
    assert (first.memory_used_bytes, first.memory_total_bytes) == (10 * GIB, 80 * GIB)
    assert first.utilization_ratio == pytest.approx(0.42)
    assert first.temperature_celsius == 61.0
    assert first.power_watts == pytest.approx(412.5)
    # The same pid in the compute and graphics lists is one process, not two.
    assert [(p.pid, p.name, p.memory_bytes) for p in first.processes] == \
        [(4242, "python3", 9 * GIB)]


def test_nvml_initialises_once_and_caches_handles(proc_root: Path) -> None:
    fake = FakeNvml()
    source = nvml_source(fake, proc_root)
    for _ in range(3):
        source.read()
    assert fake.count("nvmlInit") == 1
    assert fake.count("nvmlDeviceGetHandleByIndex") == 1
    assert fake.count("nvmlDeviceGetMemoryInfo") == 3


def test_nvml_library_missing_fails_every_read_with_a_clear_message() -> None:
    source = NvmlSource(None)
    with pytest.raises(GpuError, match=r"pynvml .* not installed"):
        source.read()
    with pytest.raises(GpuError):
        source.read()


def test_nvml_init_failure_backs_off_and_recovers(proc_root: Path) -> None:
    fake, clock = FakeNvml(), FakeClock(100.0)
    source = nvml_source(fake, proc_root, clock)
    fake.fail["nvmlInit"] = CODES["DRIVER_NOT_LOADED"]
    with pytest.raises(GpuError, match="NVML init failed: NVMLError_DriverNotLoaded"):
        source.read()
    # Within the backoff the driver is not asked again.
    with pytest.raises(GpuError, match=r"next NVML init in 1\.0s"):
        source.read()
    assert fake.count("nvmlInit") == 1
    clock.now += 1.0
    with pytest.raises(GpuError):
        source.read()
    assert fake.count("nvmlInit") == 2
    clock.now += 1.5  # the backoff doubled to 2 s
    with pytest.raises(GpuError, match="next NVML init"):
        source.read()
    del fake.fail["nvmlInit"]
    clock.now += 0.5
    assert source.read()[0].memory_used_bytes == 10 * GIB


def test_nvml_backoff_is_capped(proc_root: Path) -> None:
    fake, clock = FakeNvml(), FakeClock(100.0)
    source = nvml_source(fake, proc_root, clock)
    fake.fail["nvmlInit"] = CODES["LIBRARY_NOT_FOUND"]
    for _ in range(6):
        with pytest.raises(GpuError):
            source.read()
        clock.now += 4.0  # max_backoff_s: every attempt after this is allowed again
    assert fake.count("nvmlInit") == 6


def test_nvml_enumeration_failure_undoes_its_init(proc_root: Path) -> None:
    fake = FakeNvml()
    fake.fail["nvmlDeviceGetCount"] = CODES["UNKNOWN"]
    with pytest.raises(GpuError, match="init failed"):
        nvml_source(fake, proc_root).read()
    assert fake.count("nvmlInit") == fake.count("nvmlShutdown") == 1


@pytest.mark.parametrize("code", ["DRIVER_NOT_LOADED", "GPU_IS_LOST", "UNKNOWN"])
def test_nvml_error_mid_run_tears_down_and_reinitialises(proc_root: Path, code: str) -> None:
    fake, clock = FakeNvml(), FakeClock(100.0)
    source = nvml_source(fake, proc_root, clock)
    source.read()
    fake.fail["nvmlDeviceGetMemoryInfo"] = CODES[code]
    with pytest.raises(GpuError, match="NVML call failed: NVMLError_"):
        source.read()
    assert fake.count("nvmlShutdown") == 1
    del fake.fail["nvmlDeviceGetMemoryInfo"]
    clock.now += 1.0
    assert source.read()[0].uuid == "GPU-0000"
    assert fake.count("nvmlInit") == 2


def test_gpu_lost_on_an_optional_call_is_a_failure_not_a_missing_field(proc_root: Path) -> None:
    fake = FakeNvml()
    fake.fail["nvmlDeviceGetPowerUsage"] = CODES["GPU_IS_LOST"]
    with pytest.raises(GpuError, match="GpuIsLost"):
        nvml_source(fake, proc_root).read()


def test_unsupported_optional_calls_leave_their_fields_out(proc_root: Path) -> None:
    fake = FakeNvml()
    for name in ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature",
                 "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetComputeRunningProcesses",
                 "nvmlDeviceGetGraphicsRunningProcesses"):
        fake.fail[name] = CODES["NOT_SUPPORTED"]
    (reading,) = nvml_source(fake, proc_root).read()
    assert reading.memory_used_bytes == 10 * GIB
    assert reading.power_watts is None
    assert reading.temperature_celsius is None
    assert reading.utilization_ratio is None
    assert reading.processes == ()


def test_memory_v2_unsupported_falls_back_to_v1(proc_root: Path) -> None:
    fake = FakeNvml()
    real = fake.module.nvmlDeviceGetMemoryInfo

    def v1_only(handle: Any, version: int | None = None) -> Any:
        if version is not None:
            raise fake.errors[CODES["NOT_SUPPORTED"]](CODES["NOT_SUPPORTED"])
        return real(handle)

    fake.module.nvmlDeviceGetMemoryInfo = v1_only  # type: ignore[attr-defined]
    source = nvml_source(fake, proc_root)
    assert source.read()[0].memory_used_bytes == 10 * GIB + (512 << 20)
    assert not source._memory_v2  # asked once, then v1 directly


def test_nvml_module_without_memory_v2_uses_v1(proc_root: Path) -> None:
    assert nvml_source(FakeNvml(memory_v2=False), proc_root).read()[0].memory_used_bytes == \
        10 * GIB + (512 << 20)


def test_process_memory_not_available_is_left_out(proc_root: Path) -> None:
    fake = FakeNvml()
    fake.gpus[0]["compute"] = [(4242, None), (777, 2 * GIB)]
    fake.gpus[0]["graphics"] = []
    (reading,) = nvml_source(fake, proc_root).read()
    assert [(p.pid, p.name) for p in reading.processes] == [(777, "unknown")]


def test_close_shuts_nvml_down_once(proc_root: Path) -> None:
    fake = FakeNvml()
    source = nvml_source(fake, proc_root)
    source.close()  # never initialised: nothing to shut down
    source.read()
    source.close()
    source.close()
    assert fake.count("nvmlShutdown") == 1


# --- FileSource ------------------------------------------------------------------------------


def write_gpus(path: Path, *ratios: float, total: int = 24 * GIB) -> None:
    payload = {"gpus": [{"index": i, "uuid": f"GPU-f{i}", "name": "Drill",
                         "memory_used_bytes": int(total * r), "memory_total_bytes": total}
                        for i, r in enumerate(ratios)]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def test_file_source_rereads_the_file_every_poll(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    source = FileSource(path)
    write_gpus(path, 0.5)
    assert source.read()[0].used_ratio == pytest.approx(0.5)
    write_gpus(path, 0.95, 0.1)
    readings = source.read()
    assert [round(r.used_ratio, 2) for r in readings] == [0.95, 0.1]
    assert readings[1].uuid == "GPU-f1"
    assert readings[1].utilization_ratio is None


def test_file_source_reads_optional_fields(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"gpus": [{
        "memory_used_bytes": 1, "memory_total_bytes": 4, "utilization_ratio": 0.5,
        "temperature_celsius": 70, "power_watts": 250.5,
        "processes": [{"pid": 9, "name": "tts", "memory_bytes": 1}]}]}))
    (r,) = FileSource(path).read()
    assert (r.index, r.uuid, r.name) == (0, "file-0", "file")
    assert (r.utilization_ratio, r.temperature_celsius, r.power_watts) == (0.5, 70.0, 250.5)
    assert r.processes[0].name == "tts"


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read the GPU file"),
    ("{\"gpus\": [", "not valid JSON"),
    ("[1, 2]", r"expected a mapping, got \[1, 2\]"),
    ('{"gpus": {}}', "gpus: expected a list"),
    ('{"gpus": [7]}', r"gpus\[0\]: expected a mapping"),
    ('{"gpus": [{"memory_used_bytes": 1}]}', r"gpus\[0\]\.memory_total_bytes: missing"),
    ('{"gpus": [{"memory_used_bytes": "9", "memory_total_bytes": 1}]}', "memory_used_bytes"),
    ('{"gpus": [{"memory_used_bytes": NaN, "memory_total_bytes": 1}]}', "a finite number"),
    ('{"gpus": [{"memory_used_bytes": 1, "memory_total_bytes": Infinity}]}', "a finite number"),
    ('{"gpus": [{"memory_used_bytes": 1e999, "memory_total_bytes": 1}]}', "a finite number"),
    ("[" * 100_000, "not valid JSON"),
    ('{"gpus": [{"memory_used_bytes": 1, "memory_total_bytes": 2, "index": 99999}]}',
     r"gpus\[0\]\.index: expected a value <= 1023"),
    ('{"gpus": [{"memory_used_bytes": -1, "memory_total_bytes": 1}]}', "expected a value >= 0"),
    ('{"gpus": [{"memory_used_bytes": 1, "memory_total_bytes": 0}]}', "greater than 0"),
    ('{"gpus": [{"memory_used_bytes": 1, "memory_total_bytes": 2, "processes": [{"pid": 1}]}]}',
     r"processes\[0\]\.memory_bytes: missing"),
])
def test_file_source_rejects_what_is_not_a_reading(tmp_path: Path, content: str | None,
                                                  problem: str) -> None:
    path = tmp_path / "gpu.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GpuError, match=problem) as info:
        FileSource(path).read()
    assert str(path) in str(info.value)


def test_make_source_reads_from_the_configured_source(tmp_path: Path) -> None:
    assert make_source("none").read() == []
    path = tmp_path / "g.json"
    write_gpus(path, 0.25, 0.75)
    readings = make_source(f"file:{path}").read()
    assert [(r.uuid, r.used_ratio) for r in readings] == [("GPU-f0", 0.25), ("GPU-f1", 0.75)]
    # reading NVML needs a driver: what "nvml" must pick is the source that asks it
    assert isinstance(make_source("nvml"), NvmlSource)


# --- GpuCollector ----------------------------------------------------------------------------


def make_collector(source: Any, gate: Gate | None = None, stale_after_s: float = 2.0,
                   watch: DeviceWatch | None = None) -> tuple[GpuCollector, SidecarMetrics]:
    metrics = SidecarMetrics()
    return GpuCollector(source, metrics, gate, 0.25, stale_after_s, watch), metrics


def gpu_errors(metrics: SidecarMetrics) -> float:
    return metrics.collector_errors.get(("gpu",))


async def test_collector_publishes_every_series_of_a_good_poll(proc_root: Path) -> None:
    collector, m = make_collector(nvml_source(FakeNvml(), proc_root))
    await collector.poll_once()
    key = ("0", "GPU-0000")
    assert m.gpu_up.get() == 1.0
    assert m.gpu_info.get(("0", "GPU-0000", "Fake H100")) == 1.0
    assert m.gpu_memory_used.get(key) == 10 * GIB
    assert m.gpu_memory_total.get(key) == 80 * GIB
    assert m.gpu_utilization.get(key) == pytest.approx(0.42)
    assert m.gpu_temperature.get(key) == 61.0
    assert m.gpu_power.get(key) == 412.5
    assert m.gpu_process_memory.get(("0", "4242", "python3")) == 9 * GIB
    await collector.stop()


async def test_unsupported_optional_metrics_are_absent_and_gpu_up_stays_1(
        proc_root: Path) -> None:
    fake = FakeNvml()
    fake.fail["nvmlDeviceGetPowerUsage"] = CODES["NOT_SUPPORTED"]
    fake.fail["nvmlDeviceGetTemperature"] = CODES["NOT_SUPPORTED"]
    collector, m = make_collector(nvml_source(fake, proc_root))
    await collector.poll_once()
    assert m.gpu_up.get() == 1.0
    assert gpu_errors(m) == 0
    assert m.gpu_power.values == {}
    assert m.gpu_temperature.values == {}
    assert m.gpu_memory_used.get(("0", "GPU-0000")) == 10 * GIB
    await collector.stop()


async def test_gpu_lost_mid_run_sets_up_0_drops_values_logs_once_and_recovers(
        proc_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake, clock = FakeNvml(), FakeClock(100.0)
    collector, m = make_collector(nvml_source(fake, proc_root, clock))
    await collector.poll_once()
    assert m.gpu_memory_used.values
    caplog.set_level(logging.INFO, logger="exporter.gpu")
    fake.fail["nvmlDeviceGetMemoryInfo"] = CODES["GPU_IS_LOST"]
    for _ in range(3):
        await collector.poll_once()
    assert m.gpu_up.get() == 0.0
    assert gpu_errors(m) == 3
    # No series of the lost GPU is left looking fresh.
    for family in (m.gpu_info, m.gpu_memory_used, m.gpu_memory_total, m.gpu_utilization,
                   m.gpu_temperature, m.gpu_power, m.gpu_process_memory):
        assert family.values == {}, family.name
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 1
    assert "NVMLError_GpuIsLost" in failures[0]
    assert "tts_gpu_up=0" in failures[0]
    del fake.fail["nvmlDeviceGetMemoryInfo"]
    clock.now += 1.0
    await collector.poll_once()
    assert m.gpu_up.get() == 1.0
    assert m.gpu_memory_used.get(("0", "GPU-0000")) == 10 * GIB
    assert any("recovered after 3 failed polls" in r.getMessage() for r in caplog.records)
    await collector.stop()


async def test_missing_library_and_init_failure_are_gpu_up_0_not_a_crash(
        proc_root: Path) -> None:
    fake = FakeNvml()
    fake.fail["nvmlInit"] = CODES["DRIVER_NOT_LOADED"]
    for source in (NvmlSource(None), nvml_source(fake, proc_root)):
        collector, m = make_collector(source)
        await collector.poll_once()
        assert m.gpu_up.get() == 0.0
        assert gpu_errors(m) == 1
        await collector.stop()


async def test_a_source_that_raises_anything_is_a_failed_poll() -> None:
    class Broken:
        def read(self) -> list[GpuReading]:
            raise ZeroDivisionError("bug")

        def close(self) -> None:
            pass

    collector, m = make_collector(Broken())
    await collector.poll_once()
    assert m.gpu_up.get() == 0.0
    assert gpu_errors(m) == 1
    await collector.stop()


@pytest.mark.parametrize("content", [None, "{not json", '{"gpus": "none"}'])
async def test_file_source_errors_are_counted_and_set_gpu_up_0(
        tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "gpu.json"
    write_gpus(path, 0.5)
    collector, m = make_collector(FileSource(path))
    await collector.poll_once()
    assert m.gpu_up.get() == 1.0
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    await collector.poll_once()
    await collector.poll_once()
    assert m.gpu_up.get() == 0.0
    assert gpu_errors(m) == 2
    assert m.gpu_memory_used.values == {}
    await collector.stop()


async def test_a_read_that_hangs_goes_stale_and_closes_a_fail_safe_gate(tmp_path: Path) -> None:
    """A FIFO with no writer blocks ``open``: the read hangs like a wedged driver."""
    path = tmp_path / "gpu.fifo"
    os.mkfifo(path)
    gate = Gate(on_gpu_failure="close", stale_after_s=0.2, reopen_after_s=0.0)
    collector, m = make_collector(FileSource(path), gate, stale_after_s=0.2)
    await collector.poll_once()
    assert m.gpu_up.get() == 0.0
    assert gpu_errors(m) == 1
    assert gate.reasons == {"vram"}
    # The next poll waits on the same read instead of stacking a second one on the thread.
    await collector.poll_once()
    assert gpu_errors(m) == 2
    # The "driver" answers: the pending read completes and the next poll uses it.
    payload = json.dumps({"gpus": [{"memory_used_bytes": 1, "memory_total_bytes": 10}]})
    await asyncio.to_thread(path.write_text, payload)
    await collector.poll_once()
    assert m.gpu_up.get() == 1.0
    assert gate.state.open
    await collector.stop()


async def test_collector_feeds_the_gate_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    gate = Gate(reopen_after_s=0.0)
    collector, _ = make_collector(FileSource(path), gate)
    write_gpus(path, 0.5, 0.95)
    await collector.poll_once()
    assert not gate.state.open
    assert gate.reasons == {"vram"}
    write_gpus(path, 0.5, 0.88)  # between the thresholds: stays closed
    await collector.poll_once()
    assert not gate.state.open
    write_gpus(path, 0.5, 0.5)
    await collector.poll_once()
    assert gate.state.open
    await collector.stop()


async def test_failed_polls_reach_the_gate_policy(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    gate = Gate(on_gpu_failure="close", stale_after_s=0.0)
    collector, _ = make_collector(FileSource(path), gate)
    await collector.poll_once()  # no file: a failed poll, stale at once with stale_after_s 0
    assert gate.reasons == {"vram"}
    await collector.stop()


async def test_a_gpu_that_was_seen_and_vanishes_is_a_failed_reading(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    collector, m = make_collector(FileSource(path))
    write_gpus(path, 0.2, 0.3)
    await collector.poll_once()
    assert set(m.gpu_memory_used.values) == {("0", "GPU-f0"), ("1", "GPU-f1")}
    write_gpus(path, 0.2)
    await collector.poll_once()
    assert m.gpu_up.get() == 0.0
    assert gpu_errors(m) == 1
    assert m.gpu_memory_used.values == {}  # no series of either GPU looks fresh
    write_gpus(path, 0.2, 0.3)  # it came back
    await collector.poll_once()
    assert m.gpu_up.get() == 1.0
    assert len(m.gpu_memory_used.values) == 2
    await collector.stop()


@pytest.mark.parametrize("policy", ["close", "hold"])
async def test_an_empty_gpu_list_does_not_reopen_a_closed_gate(tmp_path: Path,
                                                                policy: str) -> None:
    """Issue 14 finding 8: VRAM at 95 % closed the gate, then ``{"gpus": []}`` set
    tts_gpu_up 1 and reopened it."""
    path = tmp_path / "gpu.json"
    gate = Gate(on_gpu_failure=policy, stale_after_s=0.0, reopen_after_s=0.0)
    collector, m = make_collector(FileSource(path), gate)
    write_gpus(path, 0.95)
    await collector.poll_once()
    assert gate.reasons == {"vram"}
    path.write_text('{"gpus": []}')
    for _ in range(3):
        await collector.poll_once()
    assert m.gpu_up.get() == 0.0
    assert gate.reasons == {"vram"}
    assert not gate.state.open
    await collector.stop()


async def test_nvml_reporting_zero_devices_after_a_reinit_is_a_failed_reading(
        proc_root: Path) -> None:
    fake, clock = FakeNvml(), FakeClock(100.0)
    gate = Gate(on_gpu_failure="close", stale_after_s=0.0, reopen_after_s=0.0)
    collector, m = make_collector(nvml_source(fake, proc_root, clock), gate)
    fake.gpus[0]["used"] = 76 * GIB  # 95 %
    await collector.poll_once()
    assert gate.reasons == {"vram"}
    fake.fail["nvmlDeviceGetMemoryInfo"] = CODES["GPU_IS_LOST"]
    await collector.poll_once()
    del fake.fail["nvmlDeviceGetMemoryInfo"]
    fake.gpus.clear()  # the driver came back without the GPU
    clock.now += 1.0
    await collector.poll_once()
    assert fake.count("nvmlInit") == 2
    assert m.gpu_up.get() == 0.0
    assert gpu_errors(m) == 2
    assert not gate.state.open
    await collector.stop()


# --- Health signals: XID events, ECC, remapped rows, clock events, SM clock ---------------------


async def test_health_signals_are_published_per_gpu(proc_root: Path) -> None:
    fake = FakeNvml()
    fake.gpus[0].update(ecc=3, rows=(2, 1, 1, 0), reasons=0x40 | 0x80 | 0x1)
    collector, m = make_collector(nvml_source(fake, proc_root))
    await collector.poll_once()
    key = ("0", "GPU-0000")
    assert m.gpu_sm_clock.get(key) == 1980e6
    assert m.gpu_ecc_uncorrected.get(key) == 3
    assert m.gpu_remapped_rows.get((*key, "correctable")) == 2
    assert m.gpu_remapped_rows.get((*key, "uncorrectable")) == 1
    assert (m.gpu_row_remap_pending.get(key), m.gpu_row_remap_failed.get(key)) == (1.0, 0.0)
    active = {labels[2] for labels, v in m.gpu_clock_event_active.values.items() if v}
    assert active == {"hw_thermal_slowdown", "hw_power_brake_slowdown"}  # idle is no incident
    assert m.gpu_clock_event_active.get((*key, "sw_power_cap")) == 0.0
    await collector.stop()


async def test_xid_events_are_counted_by_gpu_and_code_with_the_time_read(
        proc_root: Path) -> None:
    fake = FakeNvml(gpus=2)
    source = NvmlSource(fake.module, proc_root=proc_root, clock=FakeClock(100.0),
                        wall_clock=lambda: 1_700_000_000.0)
    collector, m = make_collector(source)
    await collector.poll_once()
    assert m.gpu_xid_errors.values == {}
    fake.push_xid(1, 79)
    fake.push_xid(1, 79)
    fake.push_xid(0, 48)
    await collector.poll_once()
    assert m.gpu_xid_errors.get(("1", "GPU-0001", "79")) == 2
    assert m.gpu_xid_errors.get(("0", "GPU-0000", "48")) == 1
    assert m.gpu_xid_last_event.get(("1", "GPU-0001", "79")) == 1_700_000_000.0
    # Failed polls do not undo counted events.
    fake.fail["nvmlDeviceGetMemoryInfo"] = CODES["GPU_IS_LOST"]
    await collector.poll_once()
    assert m.gpu_xid_errors.get(("1", "GPU-0001", "79")) == 2
    await collector.stop()


async def test_the_xid_of_a_gpu_falling_off_the_bus_is_counted_though_its_poll_fails(
        proc_root: Path) -> None:
    fake = FakeNvml(gpus=2)
    collector, m = make_collector(nvml_source(fake, proc_root),
                                  watch=DeviceWatch(["GPU-0001"]))
    await collector.poll_once()
    fake.push_xid(1, 79)
    fake.push_xid(0, 79)  # another pod's GPU: not this sidecar's to count
    fake.fail["nvmlDeviceGetMemoryInfo"] = CODES["GPU_IS_LOST"]
    await collector.poll_once()
    assert m.gpu_up.get() == 0.0
    assert m.gpu_xid_errors.values == {("1", "GPU-0001", "79"): 1.0}
    await collector.stop()


def test_event_reads_never_wait_and_are_bounded_per_poll(proc_root: Path) -> None:
    from exporter.system.gpu.nvml import MAX_EVENTS_PER_POLL

    fake = FakeNvml()
    for _ in range(MAX_EVENTS_PER_POLL + 5):
        fake.push_xid(0, 13)
    source = nvml_source(fake, proc_root)
    assert len(source.read()[0].xid_events) == MAX_EVENTS_PER_POLL
    assert len(source.read()[0].xid_events) == 5  # the rest on the next poll
    assert set(fake.event_waits) == {0}


async def test_unsupported_signals_are_noted_once_and_their_series_absent(
        proc_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exporter.gpu")
    fake = FakeNvml()
    calls = ("nvmlDeviceGetClockInfo", "nvmlDeviceGetTotalEccErrors",
             "nvmlDeviceGetRemappedRows", "nvmlDeviceGetCurrentClocksEventReasons",
             "nvmlDeviceRegisterEvents", "nvmlDeviceGetPowerUsage")
    for name in calls:
        fake.fail[name] = CODES["NOT_SUPPORTED"]
    collector, m = make_collector(nvml_source(fake, proc_root))
    for _ in range(5):
        await collector.poll_once()
    assert m.gpu_up.get() == 1.0
    assert gpu_errors(m) == 0
    for family in (m.gpu_sm_clock, m.gpu_ecc_uncorrected, m.gpu_remapped_rows,
                   m.gpu_row_remap_pending, m.gpu_clock_event_active, m.gpu_power):
        assert family.values == {}, family.name
    assert {name: fake.count(name) for name in calls} == dict.fromkeys(calls, 1)
    assert fake.count("nvmlEventSetWait_v2") == 0  # no GPU registered: nothing to wait on
    notes = [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()]
    assert len(notes) == len(calls)
    (reading,) = collector.source.read()
    assert reading.unsupported >= {"sm_clock", "ecc", "remapped_rows", "clock_events", "xid"}


def test_a_pynvml_without_the_newer_calls_reads_memory_as_before(proc_root: Path) -> None:
    fake = FakeNvml()
    for name in ("nvmlDeviceGetRemappedRows", "nvmlDeviceGetCurrentClocksEventReasons",
                 "nvmlEventSetCreate", "nvmlEventSetWait_v2", "nvmlDeviceGetMigMode"):
        delattr(fake.module, name)
    (reading,) = nvml_source(fake, proc_root).read()
    assert reading.memory_used_bytes == 10 * GIB
    assert reading.remapped_rows is None
    assert reading.clock_events is None
    assert {"remapped_rows", "clock_events", "xid"} <= reading.unsupported


def test_mig_instances_are_read_as_devices_of_their_own(proc_root: Path) -> None:
    fake = FakeNvml()
    mig = FakeNvml.gpu("MIG-aaaa-bbbb", 5 * GIB, total=20 * GIB)
    del mig["mig"]
    fake.gpus[0]["mig"] = [None, mig]  # slot 0 empty, slot 1 holds an instance
    readings = nvml_source(fake, proc_root).read()
    assert [(r.label, r.uuid) for r in readings] == [("0", "GPU-0000"),
                                                     ("0/mig1", "MIG-aaaa-bbbb")]
    assert readings[1].used_ratio == 0.25
    assert readings[1].utilization_ratio is None


# --- Which GPUs are followed (gpu.devices) -----------------------------------------------------


def reading(label_index: int, uuid: str, ratio: float = 0.5) -> GpuReading:
    return GpuReading(label_index, uuid, "x", int(ratio * 100), 100)


def test_a_listed_gpu_matches_by_uuid_in_either_form_or_by_index() -> None:
    readings = [reading(0, "GPU-AAAA"), reading(1, "GPU-bbbb"), reading(2, "GPU-cccc")]
    assert [r.uuid for r in DeviceWatch(["aaaa", "2"]).select(readings)] == \
        ["GPU-AAAA", "GPU-cccc"]
    assert canonical_uuid("MIG-1C2D") == canonical_uuid("1c2d") == "1c2d"
    with pytest.raises(GpuError, match="followed GPU not reported by the source: GPU-dddd"):
        DeviceWatch(["GPU-dddd"]).select(readings)


def test_auto_follows_the_app_then_none_when_a_ready_app_holds_no_gpu() -> None:
    watch = DeviceWatch("auto")
    readings = [reading(0, "GPU-aaaa"), reading(1, "GPU-bbbb")]
    assert len(watch.select(readings)) == 2
    assert watch.mode == "all"
    assert not watch.follow_app([], ready=False)  # still loading: says nothing yet
    assert watch.follow_app(["bbbb"], ready=True)
    assert [r.uuid for r in watch.select(readings)] == ["GPU-bbbb"]
    assert watch.mode == "app"
    assert not watch.follow_app(["bbbb"], ready=True)
    assert watch.follow_app([], ready=True)
    assert watch.select(readings) == []
    assert watch.mode == "none"
    assert not DeviceWatch("all").follow_app(["bbbb"], ready=True)


async def test_the_mode_in_force_shows_in_a_metric_and_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    from exporter.system.probe import AppGpu, AppStatus

    caplog.set_level(logging.INFO, logger="exporter.gpu")
    metrics = SidecarMetrics()
    collector = GpuCollector(NoneSource(), metrics, watch=DeviceWatch("auto"))
    assert metrics.gpu_watch_mode.values == {("auto", "all"): 1.0}
    collector.on_app_status(AppStatus(0, 0, 1, 1.0, gpu_devices=(AppGpu(0, "GPU-aaaa"),)))
    assert metrics.gpu_watch_mode.values == {("auto", "app"): 1.0}
    assert "now following the app's CUDA devices GPU-aaaa" in caplog.text
    collector.on_app_status(AppStatus(0, 0, 1, 1.0))  # no gpu_devices field: no news
    assert metrics.gpu_watch_mode.values == {("auto", "app"): 1.0}
    await collector.stop()


async def test_start_polls_before_returning_and_keeps_polling(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    write_gpus(path, 0.2)
    metrics = SidecarMetrics()
    collector = GpuCollector(FileSource(path), metrics, None, poll_interval_s=0.01)
    await collector.start()
    assert metrics.gpu_up.get() == 1.0
    write_gpus(path, 0.7)
    for _ in range(200):
        if metrics.gpu_memory_used.get(("0", "GPU-f0")) == int(24 * GIB * 0.7):
            break
        await asyncio.sleep(0.01)
    assert metrics.gpu_memory_used.get(("0", "GPU-f0")) == int(24 * GIB * 0.7)
    await collector.stop()


# --- The sidecar on a multi-GPU node --------------------------------------------------------


def write_node(path: Path, mine: float, other: float) -> None:
    """A node with two GPUs: ``GPU-other-0`` (another pod's) and ``GPU-mine-1`` (this pod's)."""
    total = 80 * GIB
    payload = {"gpus": [{"index": i, "uuid": uuid, "memory_used_bytes": int(total * ratio),
                         "memory_total_bytes": total}
                        for i, (uuid, ratio) in enumerate((("GPU-other-0", other),
                                                           ("GPU-mine-1", mine)))]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


@pytest.mark.slow
@pytest.mark.parametrize(("devices", "mode"), [("auto", ("auto", "app")),
                                               (["1"], ("list", "list"))])
async def test_on_a_shared_node_only_this_pods_gpu_closes_its_gate(
        tmp_path: Path, aiohttp_server: Any, unused_tcp_port: int, devices: Any,
        mode: tuple[str, str]) -> None:
    """Through real HTTP, with ``gpu.devices: auto`` (the app's /status names its CUDA device,
    the bare UUID as torch gives it) or the GPU's index: another GPU at 95 % leaves /ingress
    open, this pod's GPU at 90 % closes it within a second."""
    import aiohttp
    from aiohttp import web

    from exporter.config import config_from_mapping
    from exporter.sidecar import Sidecar

    async def status(_: web.Request) -> web.Response:
        return web.json_response({"waiting": 0, "running": 0, "capacity": 8, "started_at": 1.0,
                                  "ready": True, "gpu_devices": [
                                      {"index": 0, "uuid": "mine-1",
                                       "memory_allocated_bytes": 2 * GIB,
                                       "memory_reserved_bytes": 3 * GIB, "gpu_oom_total": 1}]})

    app = web.Application()
    app.router.add_get("/status", status)
    app_server = await aiohttp_server(app)
    gpu_file = tmp_path / "gpu.json"
    write_node(gpu_file, mine=0.40, other=0.95)
    sidecar = Sidecar(config_from_mapping({
        "server": {"listen": f"127.0.0.1:{unused_tcp_port}"},
        "logs": {"paths": []},
        "gpu": {"source": f"file:{gpu_file}", "poll_interval_s": 0.25, "devices": devices},
        "gate": {"gate_file": str(tmp_path / "ingress.json"), "reopen_after_s": 0.3},
        "probe": {"url": str(app_server.make_url("/status")), "interval_s": 0.25},
    }))
    await sidecar.start()
    try:
        async with aiohttp.ClientSession() as session:
            async def ingress() -> int:
                async with session.get(f"http://127.0.0.1:{unused_tcp_port}/ingress") as r:
                    return r.status

            for _ in range(4):  # a few polls with the other pod's GPU at 95 %
                assert await ingress() == 200
                await asyncio.sleep(0.25)
            m = sidecar.metrics
            assert set(m.gpu_memory_used.values) == {("1", "GPU-mine-1")}
            assert m.gpu_watch_mode.values == {mode: 1.0}
            assert m.app_gpu_reserved.get(("0", "mine-1")) == 3 * GIB
            assert m.app_gpu_oom.get(("0", "mine-1")) == 1

            crossed = time.monotonic()
            write_node(gpu_file, mine=0.90, other=0.95)
            while await ingress() != 503:
                assert time.monotonic() - crossed < 1.0, "this pod's GPU at 90 % left it open"
                await asyncio.sleep(0.02)
            assert json.loads((tmp_path / "ingress.json").read_text())["open"] is False
    finally:
        await sidecar.stop()


# --- gpu.devices in the config ------------------------------------------------------------


@pytest.mark.parametrize(("devices", "expected"), [
    ("auto", "auto"), ("all", "all"),
    ([0, "GPU-8f3a", "MIG-1c2d", "0/mig1"], ["0", "GPU-8f3a", "MIG-1c2d", "0/mig1"]),
])
def test_gpu_devices_accepts_all_auto_and_a_list(tmp_path: Path, devices: Any,
                                                 expected: Any) -> None:
    from exporter.config import load_config

    path = tmp_path / "exporter.yaml"
    path.write_text(json.dumps({"gpu": {"devices": devices}}))
    assert load_config(path).gpu.device_list() == expected


@pytest.mark.parametrize(("devices", "problem"), [
    ("some", "expected 'auto', 'all' or a non-empty list of GPU UUIDs or indices, got 'some'"),
    ([], "a non-empty list"),
    ([-1], "indices >= 0"),
    ([" "], "GPU UUIDs"),
    ([0, "0"], "each GPU once"),
    ([True], r"gpu.devices\[0\]: expected an integer or a string, got True"),
])
def test_a_bad_gpu_devices_stops_start_up_naming_file_and_key(tmp_path: Path, devices: Any,
                                                              problem: str) -> None:
    from exporter.config import ConfigError, load_config

    path = tmp_path / "exporter.yaml"
    path.write_text(json.dumps({"gpu": {"devices": devices}}))
    with pytest.raises(ConfigError, match=problem) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: gpu.devices")
