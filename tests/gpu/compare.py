"""The pure parts of the one-shot GPU check: nvidia-smi's CSV, the tolerances a reading of
the sidecar may differ from it by, and percentiles. Tested without a GPU (test_compare.py)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from exporter.system.gpu import GpuReading, canonical_uuid

MIB = 1 << 20

# What `nvidia-smi --query-gpu=...` is asked for, in this order; units are stripped with
# --format=csv,noheader,nounits (MiB, %, degrees C, W).
SMI_GPU_FIELDS = ("index", "uuid", "memory.used", "memory.total", "utilization.gpu",
                  "temperature.gpu", "power.draw")
SMI_APP_FIELDS = ("gpu_uuid", "pid", "used_memory")


@dataclass(frozen=True)
class Tolerance:
    """How far the sidecar may read from nvidia-smi, and why that far.

    The two are sampled a moment apart, so values that move by themselves (utilisation,
    power) get room for that movement; memory and temperature barely move between samples.
    nvidia-smi rounds memory to MiB.
    """

    memory_bytes: int = 64 * MIB        # other processes allocate between the two samples
    utilization_ratio: float = 0.20     # a 1/6 s sampling window on a busy GPU
    temperature_celsius: float = 3.0
    power_ratio: float = 0.20           # of nvidia-smi's figure, or power_watts, the larger
    power_watts: float = 25.0


@dataclass(frozen=True)
class Disagreement:
    gpu: str
    field: str
    sidecar: float | str | None
    nvidia_smi: float | str | None
    allowed: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_smi_csv(text: str, fields: Sequence[str]) -> list[dict[str, float | str | None]]:
    """Rows of ``nvidia-smi --query-…=<fields> --format=csv,noheader,nounits``: numbers as
    floats, ``[N/A]``/``[Not Supported]`` as None, the rest (uuid) as text."""
    rows = []
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(fields):
            raise ValueError(f"nvidia-smi line {line_no}: expected {len(fields)} fields "
                             f"({', '.join(fields)}), got {len(row)}: {row!r}")
        rows.append({name: _value(cell) for name, cell in zip(fields, row, strict=True)})
    return rows


def _value(cell: str) -> float | str | None:
    cell = cell.strip()
    if cell.startswith("[") or cell in ("", "N/A"):
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def compare(readings: Iterable[GpuReading], gpus: Sequence[dict[str, Any]],
            apps: Sequence[dict[str, Any]], tolerance: Tolerance = Tolerance()) \
        -> list[Disagreement]:
    """Every field where the sidecar's reading differs from nvidia-smi's beyond ``tolerance``;
    a GPU or process one side has and the other lacks is a disagreement too."""
    found: list[Disagreement] = []
    by_uuid = {canonical_uuid(str(row["uuid"])): row for row in gpus}
    seen = set()
    for r in readings:
        if r.mig_index is not None:  # nvidia-smi --query-gpu lists physical GPUs only
            continue
        key = canonical_uuid(r.uuid)
        seen.add(key)
        row = by_uuid.get(key)
        if row is None:
            found.append(Disagreement(r.label, "present", r.uuid, None, "the same GPUs"))
            continue
        mem_tol = tolerance.memory_bytes
        checks: list[tuple[str, float | None, float | None, float, str]] = [
            ("memory_used_bytes", r.memory_used_bytes, _mib(row["memory.used"]), mem_tol,
             f"±{mem_tol // MIB} MiB"),
            ("memory_total_bytes", r.memory_total_bytes, _mib(row["memory.total"]), mem_tol,
             f"±{mem_tol // MIB} MiB"),
            ("utilization_ratio", r.utilization_ratio, _ratio(row["utilization.gpu"]),
             tolerance.utilization_ratio, f"±{tolerance.utilization_ratio}"),
            ("temperature_celsius", r.temperature_celsius, row["temperature.gpu"],
             tolerance.temperature_celsius, f"±{tolerance.temperature_celsius} °C"),
        ]
        smi_power = row["power.draw"]
        power_tol = max(tolerance.power_watts, tolerance.power_ratio * (smi_power or 0.0))
        checks.append(("power_watts", r.power_watts, smi_power, power_tol,
                       f"±{power_tol:.1f} W"))
        for field, ours, theirs, allowed, text in checks:
            if (ours is None) != (theirs is None) or (
                    ours is not None and theirs is not None and abs(ours - theirs) > allowed):
                found.append(Disagreement(r.label, field, ours, theirs, text))
        found += _compare_processes(r, [a for a in apps
                                        if canonical_uuid(str(a["gpu_uuid"])) == key],
                                    tolerance)
    for key, row in by_uuid.items():
        if key not in seen:
            found.append(Disagreement(str(row["index"]), "present", None, str(row["uuid"]),
                                      "the same GPUs"))
    return found


def _compare_processes(r: GpuReading, apps: Sequence[dict[str, Any]],
                       tolerance: Tolerance) -> list[Disagreement]:
    ours = {p.pid: p.memory_bytes for p in r.processes}
    theirs = {int(a["pid"]): _mib(a["used_memory"]) for a in apps}
    found = []
    for pid in sorted(set(ours) | set(theirs)):
        a, b = ours.get(pid), theirs.get(pid)
        if a is None or b is None or abs(a - b) > tolerance.memory_bytes:
            found.append(Disagreement(r.label, f"process {pid} memory_bytes", a, b,
                                      f"±{tolerance.memory_bytes // MIB} MiB"))
    return found


def _mib(value: Any) -> float | None:
    return None if value is None else float(value) * MIB


def _ratio(value: Any) -> float | None:
    return None if value is None else float(value) / 100.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation between closest ranks, as numpy's
    default; with 10 values p99 lies between the two slowest."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
