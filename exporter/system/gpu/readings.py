"""What every GPU source produces: readings of one poll, and the one error type they raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class GpuError(Exception):
    """A GPU poll that produced no trustworthy reading; the message says why, for the log.

    ``xid_events`` carries the XID errors read before the poll failed: the XID that comes
    with a GPU falling off the bus must be counted although its reading fails.
    """

    def __init__(self, message: str, xid_events: tuple[XidEvent, ...] = ()) -> None:
        super().__init__(message)
        self.xid_events = xid_events


@dataclass(frozen=True)
class GpuProcess:
    """One process holding memory on one GPU."""

    pid: int
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class XidEvent:
    """One XID error the driver reported for a GPU (an NVML critical-error event)."""

    gpu: str            # the GPU's ``gpu`` label
    uuid: str
    xid: int
    timestamp: float


@dataclass(frozen=True)
class RemappedRows:
    """Rows of GPU memory the driver replaced with spares (A100 and later)."""

    correctable: int
    uncorrectable: int
    pending: bool
    failed: bool


@dataclass(frozen=True)
class GpuReading:
    """One GPU (or MIG instance) at one poll. Optional fields are None where the device does
    not report them; ``unsupported`` names the optional signals the device or driver cannot
    give (the source stopped asking)."""

    index: int
    uuid: str
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    mig_index: int | None = None
    sm_clock_hertz: float | None = None
    ecc_uncorrected_errors: int | None = None
    remapped_rows: RemappedRows | None = None
    clock_events: frozenset[str] | None = None
    xid_events: tuple[XidEvent, ...] = ()
    unsupported: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        """The ``gpu`` label: the NVML index, ``<index>/mig<n>`` for a MIG instance."""
        return str(self.index) if self.mig_index is None else f"{self.index}/mig{self.mig_index}"

    @property
    def used_ratio(self) -> float:
        """Memory used over installed; what the gate compares with its thresholds."""
        return self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes else 1.0


# Clock-event ("throttle") reasons exported as labelled gauges, by NVML bit. Idle and
# application/display settings are left out: they are not incidents.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
}


class GpuSource(Protocol):
    """Where readings come from. ``read`` may block (NVML can), so it runs off the event loop."""

    def read(self) -> list[GpuReading]:
        """All GPUs now, or raise :class:`GpuError`."""
        ...

    def close(self) -> None:
        """Release what ``read`` acquired (e.g. NVML's handle on the driver)."""
        ...
