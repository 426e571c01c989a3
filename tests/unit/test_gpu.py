"""GPU sources and the collector: every NVML failure mode through an injected fake ``pynvml``
module, the ``file:`` source on real files (a FIFO for a read that hangs), and the collector
feeding the gate."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.gate import Gate
from exporter.metrics import SidecarMetrics
from exporter.system.gpu import (
    FileSource,
    GpuCollector,
    GpuError,
    GpuReading,
    NoneSource,
    NvmlSource,
    make_source,
)

GIB = 1 << 30

# pynvml's error codes (nvml.h); the fake module exposes them under the same names.
CODES = {"UNINITIALIZED": 1, "NOT_SUPPORTED": 3, "DRIVER_NOT_LOADED": 9,
         "LIBRARY_NOT_FOUND": 12, "FUNCTION_NOT_FOUND": 13, "GPU_IS_LOST": 15, "UNKNOWN": 999}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeNvml:
    """Builds a module with pynvml's surface over a list of fake GPUs.

    ``fail[name] = code`` makes the call ``name`` raise ``NVMLError(code)``, as pynvml does
    (an ``NVMLError_<Name>`` subclass carrying ``value``).
    """

    def __init__(self, gpus: int = 1, memory_v2: bool = True) -> None:
        self.gpus = [{"uuid": f"GPU-{i:04d}", "name": "Fake H100", "used": (10 + i) * GIB,
                      "total": 80 * GIB, "util": 42, "temp": 61, "power_mw": 412_500,
                      "compute": [(4242, 9 * GIB)], "graphics": [(4242, 1 * GIB)]}
                      for i in range(gpus)]
        self.fail: dict[str, int] = {}
        self.calls: dict[str, int] = {}
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
                     "nvmlDeviceGetGraphicsRunningProcesses"):
            setattr(module, name, self._wrap(name, getattr(self, "_" + name)))

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


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    """A fake /proc with one process, so process names resolve without touching the host's."""
    root = tmp_path / "proc"
    (root / "4242").mkdir(parents=True)
    (root / "4242" / "comm").write_text("python3\n")
    return root


def nvml_source(fake: FakeNvml, proc_root: Path, clock: FakeClock | None = None) -> NvmlSource:
    return NvmlSource(fake.module, proc_root=proc_root, clock=clock or FakeClock(),
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
    fake, clock = FakeNvml(), FakeClock()
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
    fake, clock = FakeNvml(), FakeClock()
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
    fake, clock = FakeNvml(), FakeClock()
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
    assert reading.power_watts is None and reading.temperature_celsius is None
    assert reading.utilization_ratio is None and reading.processes == ()


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
    assert readings[1].uuid == "GPU-f1" and readings[1].utilization_ratio is None


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
    ("[1, 2]", 'expected an object with a "gpus" list'),
    ('{"gpus": {}}', 'expected an object with a "gpus" list'),
    ('{"gpus": [7]}', r"gpus\[0\]: expected an object"),
    ('{"gpus": [{"memory_used_bytes": 1}]}', r"gpus\[0\]\.memory_total_bytes: expected a number"),
    ('{"gpus": [{"memory_used_bytes": "9", "memory_total_bytes": 1}]}', "memory_used_bytes"),
    ('{"gpus": [{"memory_used_bytes": -1, "memory_total_bytes": 1}]}', "expected a number >= 0"),
    ('{"gpus": [{"memory_used_bytes": 1, "memory_total_bytes": 0}]}', "expected a number > 0"),
    ('{"gpus": [{"memory_used_bytes": 1, "memory_total_bytes": 2, "processes": [{"pid": 1}]}]}',
     r"processes\[0\]: expected pid and memory_bytes"),
])
def test_file_source_rejects_what_is_not_a_reading(tmp_path: Path, content: str | None,
                                                  problem: str) -> None:
    path = tmp_path / "gpu.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GpuError, match=problem) as info:
        FileSource(path).read()
    assert str(path) in str(info.value)


def test_make_source_picks_the_configured_source(tmp_path: Path) -> None:
    assert isinstance(make_source("none"), NoneSource)
    source = make_source(f"file:{tmp_path / 'g.json'}")
    assert isinstance(source, FileSource) and source.path == tmp_path / "g.json"
    assert isinstance(make_source("nvml"), NvmlSource)
    assert NoneSource().read() == []


# --- GpuCollector ----------------------------------------------------------------------------


def make_collector(source: Any, gate: Gate | None = None, stale_after_s: float = 2.0) \
        -> tuple[GpuCollector, SidecarMetrics]:
    metrics = SidecarMetrics()
    return GpuCollector(source, metrics, gate, 0.25, stale_after_s), metrics


def gpu_errors(metrics: SidecarMetrics) -> float:
    return metrics.collector_errors.get(("gpu",))


async def test_collector_publishes_every_series_of_a_good_poll(proc_root: Path) -> None:
    collector, m = make_collector(nvml_source(FakeNvml(), proc_root))
    await collector.poll_once()
    key = ("0", "GPU-0000")
    assert m.gpu_up.get() == 1.0
    assert m.gpu_info.get(("0", "GPU-0000", "Fake H100")) == 1.0
    assert m.gpu_memory_used.get(key) == 10 * GIB and m.gpu_memory_total.get(key) == 80 * GIB
    assert m.gpu_utilization.get(key) == pytest.approx(0.42)
    assert m.gpu_temperature.get(key) == 61.0 and m.gpu_power.get(key) == 412.5
    assert m.gpu_process_memory.get(("0", "4242", "python3")) == 9 * GIB
    await collector.stop()


async def test_unsupported_optional_metrics_are_absent_and_gpu_up_stays_1(
        proc_root: Path) -> None:
    fake = FakeNvml()
    fake.fail["nvmlDeviceGetPowerUsage"] = CODES["NOT_SUPPORTED"]
    fake.fail["nvmlDeviceGetTemperature"] = CODES["NOT_SUPPORTED"]
    collector, m = make_collector(nvml_source(fake, proc_root))
    await collector.poll_once()
    assert m.gpu_up.get() == 1.0 and gpu_errors(m) == 0
    assert m.gpu_power.values == {} and m.gpu_temperature.values == {}
    assert m.gpu_memory_used.get(("0", "GPU-0000")) == 10 * GIB
    await collector.stop()


async def test_gpu_lost_mid_run_sets_up_0_drops_values_logs_once_and_recovers(
        proc_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake, clock = FakeNvml(), FakeClock()
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
    assert len(failures) == 1 and "NVMLError_GpuIsLost" in failures[0]
    assert "tts_gpu_up=0" in failures[0]
    del fake.fail["nvmlDeviceGetMemoryInfo"]
    clock.now += 1.0
    await collector.poll_once()
    assert m.gpu_up.get() == 1.0 and m.gpu_memory_used.get(("0", "GPU-0000")) == 10 * GIB
    assert any("recovered after 3 failed polls" in r.getMessage() for r in caplog.records)
    await collector.stop()


async def test_missing_library_and_init_failure_are_gpu_up_0_not_a_crash(
        proc_root: Path) -> None:
    fake = FakeNvml()
    fake.fail["nvmlInit"] = CODES["DRIVER_NOT_LOADED"]
    for source in (NvmlSource(None), nvml_source(fake, proc_root)):
        collector, m = make_collector(source)
        await collector.poll_once()
        assert m.gpu_up.get() == 0.0 and gpu_errors(m) == 1
        await collector.stop()


async def test_a_source_that_raises_anything_is_a_failed_poll() -> None:
    class Broken:
        def read(self) -> list[GpuReading]:
            raise ZeroDivisionError("bug")

        def close(self) -> None:
            pass

    collector, m = make_collector(Broken())
    await collector.poll_once()
    assert m.gpu_up.get() == 0.0 and gpu_errors(m) == 1
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
    assert m.gpu_up.get() == 0.0 and gpu_errors(m) == 2
    assert m.gpu_memory_used.values == {}
    await collector.stop()


async def test_a_read_that_hangs_goes_stale_and_closes_a_fail_safe_gate(tmp_path: Path) -> None:
    """A FIFO with no writer blocks ``open``: the read hangs like a wedged driver."""
    path = tmp_path / "gpu.fifo"
    os.mkfifo(path)
    gate = Gate(on_gpu_failure="close", stale_after_s=0.2, reopen_after_s=0.0)
    collector, m = make_collector(FileSource(path), gate, stale_after_s=0.2)
    await collector.poll_once()
    assert m.gpu_up.get() == 0.0 and gpu_errors(m) == 1
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
    assert not gate.state.open and gate.reasons == {"vram"}
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


async def test_a_vanished_gpu_loses_its_series(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    collector, m = make_collector(FileSource(path))
    write_gpus(path, 0.2, 0.3)
    await collector.poll_once()
    assert set(m.gpu_memory_used.values) == {("0", "GPU-f0"), ("1", "GPU-f1")}
    write_gpus(path, 0.2)
    await collector.poll_once()
    assert set(m.gpu_memory_used.values) == {("0", "GPU-f0")}
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
