"""The simple GPU sources and the factory for ``gpu.source``.

- ``file:PATH``: :class:`FileSource`, a JSON file re-read on every poll; what tests, demos and
  operators' drills drive.
- ``none``: :class:`NoneSource`, no GPUs (a CPU-only deployment).
- ``nvml``: :class:`exporter.system.gpu.nvml.NvmlSource`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.system.gpu.nvml import NvmlSource
from exporter.system.gpu.readings import GpuError, GpuProcess, GpuReading, GpuSource


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
    reading. The health signals (XID, ECC, remapped rows, clock events, SM clock) come from
    NVML only.
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


def make_source(spec: str) -> GpuSource:
    """The source a ``gpu.source`` config value names (already validated by the config)."""
    if spec == "none":
        return NoneSource()
    if spec.startswith("file:"):
        return FileSource(spec[len("file:"):])
    return NvmlSource.from_import()
