"""The simple GPU sources and the factory for ``gpu.source``.

- ``file:PATH``: :class:`FileSource`, a JSON file re-read on every poll; what tests, demos and
  operators' drills drive.
- ``none``: :class:`NoneSource`, no GPUs (a CPU-only deployment).
- ``nvml``: :class:`exporter.system.gpu.nvml.NvmlSource`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from msgspec import Meta

from exporter.schema import Amount, ForeignSchema, InvalidInput, validate
from exporter.system.gpu.nvml import NvmlSource
from exporter.system.gpu.readings import GpuError, GpuProcess, GpuReading, GpuSource


class NoneSource:
    """No GPUs: a CPU-only deployment. Polls succeed with nothing, so the gate never closes for
    VRAM and ``tts_gpu_up`` stays 1 (nothing is failing)."""

    def read(self) -> list[GpuReading]:
        return []

    def close(self) -> None:
        pass


class FileProcess(ForeignSchema, frozen=True):
    pid: Annotated[int, Meta(ge=0, le=2**32)]
    memory_bytes: Amount
    name: Annotated[str, Meta(max_length=256)] = "unknown"


class FileGpu(ForeignSchema, frozen=True):
    """One GPU of the file; ``index`` and ``uuid`` default to its position."""

    memory_used_bytes: Amount
    memory_total_bytes: Annotated[float, Meta(gt=0, le=1e300)]
    index: Annotated[int, Meta(ge=0, le=1023)] | None = None
    uuid: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    name: Annotated[str, Meta(max_length=256)] = "file"
    utilization_ratio: Amount | None = None
    temperature_celsius: Amount | None = None
    power_watts: Amount | None = None
    processes: Annotated[list[FileProcess], Meta(max_length=4096)] | None = None

    def reading(self, i: int) -> GpuReading:
        return GpuReading(
            index=i if self.index is None else self.index,
            uuid=self.uuid or f"file-{i}", name=self.name,
            memory_used_bytes=int(self.memory_used_bytes),
            memory_total_bytes=int(self.memory_total_bytes),
            utilization_ratio=self.utilization_ratio,
            temperature_celsius=self.temperature_celsius, power_watts=self.power_watts,
            processes=tuple(GpuProcess(p.pid, p.name, int(p.memory_bytes))
                            for p in self.processes or ()))


class GpuFile(ForeignSchema, frozen=True):
    gpus: Annotated[list[FileGpu], Meta(max_length=1024)]


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
        except (ValueError, RecursionError) as exc:
            raise GpuError(f"{self.path}: not valid JSON ({exc})") from None
        try:
            gpus = validate(GpuFile, data).gpus
        except InvalidInput as exc:
            raise GpuError(f"{self.path}: {exc}") from None
        return [gpu.reading(i) for i, gpu in enumerate(gpus)]

    def close(self) -> None:
        pass


def make_source(spec: str) -> GpuSource:
    """The source a ``gpu.source`` config value names (already validated by the config)."""
    if spec == "none":
        return NoneSource()
    if spec.startswith("file:"):
        return FileSource(spec[len("file:"):])
    return NvmlSource.from_import()
