"""GPU readings for the metrics and the ingress gate: the readings every source produces
(``readings``), the NVML source (``nvml``), the file and none sources (``sources``), which GPUs
this pod follows (``devices``), the poll thread (``worker``) and the collector (``collector``).
"""

from exporter.system.gpu.collector import GpuCollector
from exporter.system.gpu.devices import DeviceWatch, canonical_uuid
from exporter.system.gpu.nvml import NvmlSource
from exporter.system.gpu.readings import (
    GpuError,
    GpuProcess,
    GpuReading,
    GpuSource,
    RemappedRows,
    XidEvent,
)
from exporter.system.gpu.sources import FileSource, NoneSource, make_source

__all__ = [
    "DeviceWatch",
    "FileSource",
    "GpuCollector",
    "GpuError",
    "GpuProcess",
    "GpuReading",
    "GpuSource",
    "NoneSource",
    "NvmlSource",
    "RemappedRows",
    "XidEvent",
    "canonical_uuid",
    "make_source",
]
