"""Which GPUs this pod's gate and ``tts_gpu_*`` series follow (``gpu.devices``).

- ``all``: every GPU the source reports.
- a list of UUIDs (``GPU-…``, MIG instances' ``MIG-…``) or indices (``0``, ``0/mig1``):
  exactly those.
- ``auto``: all GPUs until the app's ``/status`` first lists the CUDA devices it holds, then
  the last non-empty list it reported. A ready app that lists none (the espeak backend) means
  this pod has no GPU: nothing is followed, and the gate answers to alerts and the operator
  only. Without an app to probe, ``auto`` stays on all GPUs.

A followed GPU missing from a reading makes the whole reading a failure (``GpuError``), never a
healthy empty one: a GPU that fell off the bus must not read as "no VRAM pressure". Under
``all`` that holds for every GPU seen since start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from exporter.system.gpu.readings import GpuError, GpuReading

log = logging.getLogger("exporter.gpu")

Mode = Literal["all", "list", "app", "none"]


def canonical_uuid(uuid: str) -> str:
    """A UUID without NVML's ``GPU-``/``MIG-`` prefix, lower case: torch reports the bare
    form, NVML and ``nvidia-smi`` the prefixed one."""
    bare = uuid.strip()
    for prefix in ("GPU-", "MIG-"):
        if bare.upper().startswith(prefix):
            bare = bare[len(prefix):]
    return bare.lower()


class DeviceWatch:
    """The followed set, and the check that nothing followed has vanished."""

    def __init__(self, devices: str | Sequence[str]) -> None:
        self.configured: Literal["all", "auto", "list"]
        self._wanted: tuple[str, ...] = ()
        if isinstance(devices, str):
            assert devices in ("all", "auto"), devices  # the config validated it
            self.configured = "auto" if devices == "auto" else "all"
            self.mode: Mode = "all"
        else:
            self.configured, self.mode = "list", "list"
            self._wanted = tuple(str(d) for d in devices)
        self._seen: dict[str, GpuReading] = {}

    def describe(self) -> str:
        """The mode in force, for the log."""
        if self.mode == "all":
            return "all GPUs"
        if self.mode == "none":
            return "no GPU (the app holds no CUDA device)"
        return ("the app's CUDA devices " if self.mode == "app" else "") + ", ".join(self._wanted)

    def follow_app(self, uuids: Sequence[str], ready: bool) -> bool:
        """The app's latest device list; True when the followed set changed (then log it)."""
        if self.configured != "auto":
            return False
        if uuids:
            mode: Mode = "app"
            wanted = tuple(sorted(set(uuids)))
        elif ready:
            mode, wanted = "none", ()
        else:  # an app still loading has not said which GPU it will use
            return False
        if (mode, wanted) == (self.mode, self._wanted):
            return False
        self.mode, self._wanted = mode, wanted
        return True

    def follows(self, uuid: str, label: str) -> bool:
        """Whether the GPU ``uuid`` (``gpu`` label ``label``) is followed now."""
        if self.mode in ("all", "none"):
            return self.mode == "all"
        return any(_matches(entry, uuid, label) for entry in self._wanted)

    def select(self, readings: Sequence[GpuReading]) -> list[GpuReading]:
        """The followed readings; GpuError if a followed (or, under ``all``, seen) GPU is
        missing."""
        if self.mode == "none":
            return []
        if self.mode == "all":
            present = {canonical_uuid(r.uuid) for r in readings}
            gone = [r for key, r in self._seen.items() if key not in present]
            self._seen.update((canonical_uuid(r.uuid), r) for r in readings)
            if gone:
                raise GpuError("GPU vanished from the source: " + ", ".join(
                    f"{r.label} ({r.uuid})" for r in gone))
            return list(readings)
        chosen: dict[str, GpuReading] = {}
        missing = []
        for entry in self._wanted:
            match = next((r for r in readings
                          if _matches(entry, r.uuid, r.label)), None)
            if match is None:
                missing.append(entry)
            else:
                chosen[match.uuid] = match
        if missing:
            raise GpuError(f"followed GPU not reported by the source: {', '.join(missing)} "
                           f"(the source reports {len(readings)} GPU(s))")
        return list(chosen.values())


def _matches(entry: str, uuid: str, label: str) -> bool:
    """A ``gpu.devices`` entry names a GPU by its index label or its UUID (either form)."""
    return entry == label or canonical_uuid(entry) == canonical_uuid(uuid)
