"""The sidecar's configuration: YAML in, frozen typed value objects out.

Loaded once at start-up. Anything wrong stops start-up with a :class:`ConfigError` that lists
every problem, each naming the file, the dotted key and what was expected, e.g.::

    config/exporter.yaml: gate.close_at: expected a number, got 'high'
    config/exporter.yaml: logs.poll_interval_s: expected a finite number, got inf

The schema is the :class:`~exporter.schema.Schema` structs below: adding a setting is one line,
``name: Type = default`` with its bound (``Annotated[int, Meta(ge=..., le=...)]`` or a shared
alias such as ``Seconds``); a new section is a struct plus one line in :class:`Config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta, field

from exporter.schema import ConfigError as ConfigError
from exporter.schema import Schema, from_mapping, increasing, listen_address, load_file, rules

# Bounds every setting is checked against: the largest value that still makes sense, so a typo
# of a few zeros stops start-up instead of exhausting memory later.
Seconds = Annotated[float, Meta(gt=0, le=86400)]
Ratio = Annotated[float, Meta(ge=0, le=1)]
Text = Annotated[str, Meta(max_length=4096)]
Names = Annotated[list[Text], Meta(max_length=256)]
Buckets = Annotated[list[Annotated[float, Meta(gt=0, le=1e9)]], Meta(min_length=1,
                                                                     max_length=64)]



class ServerConfig(Schema, frozen=True):
    """Where the sidecar's HTTP server listens, and how it protects itself.

    ``web_config_file``: an exporter-toolkit web config (TLS, basic auth), applied to every
    GET route except ``unauthenticated_paths``. A request must send its head within
    ``read_header_timeout_s`` of connecting (or of its previous response) and its body within
    ``read_body_timeout_s``; at most ``max_connections`` connections are open at once.
    """

    listen: Text = "127.0.0.1:9109"
    web_config_file: Text = ""
    unauthenticated_paths: Annotated[list[Text], Meta(max_length=64)] = \
        field(default_factory=lambda: ["/ingress", "/healthz"])
    max_body_bytes: Annotated[int, Meta(gt=0, le=64 << 20)] = 65536
    read_header_timeout_s: Seconds = 5.0
    read_body_timeout_s: Seconds = 10.0
    max_connections: Annotated[int, Meta(gt=0, le=65536)] = 256

    def __post_init__(self) -> None:
        rules(listen=listen_address(self.listen, lowest_port=1))

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


DEFAULT_FIELD_ALIASES: dict[str, list[str]] = {
    "id": ["id", "request_id", "task_id", "req_id"],
    "event": ["event", "msg_event"],
    "text_len": ["text_len", "text_length", "chars"],
    "duration_ms": ["duration_ms", "elapsed_ms", "latency_ms"],
    "error_code": ["error_code", "err_code", "code"],
    "warning_code": ["warning_code", "warn_code"],
    "status": ["status", "result"],
    "stage": ["stage"],
}

DEFAULT_EVENT_ALIASES: dict[str, str] = {
    "infer_start": "synthesis_start",
    "infer_complete": "synthesis_complete",
    "infer_done": "synthesis_complete",
    "request": "http_request",
    "access": "http_request",
}


class AliasConfig(Schema, frozen=True):
    """Field and event names that other TTS services use for the contract's names."""

    fields: Annotated[dict[str, Names], Meta(max_length=256)] = \
        field(default_factory=lambda: dict(DEFAULT_FIELD_ALIASES))
    events: Annotated[dict[str, Text], Meta(max_length=1024)] = \
        field(default_factory=lambda: dict(DEFAULT_EVENT_ALIASES))


LogFormat = Literal["auto", "app", "gateway"]
Globs = Annotated[list[Text], Meta(max_length=256)]


class LogSource(Schema, frozen=True):
    """Log files of one known format: ``app`` (the log contract, text or JSON lines),
    ``gateway`` (the reverse proxy's JSON access log, config/nginx/tts.conf), ``auto``
    (decided per file from its first record line)."""

    paths: Globs = field(default_factory=list)
    format: LogFormat = "auto"


class LogsConfig(Schema, frozen=True):
    """Which log files to tail and how."""

    paths: Globs = field(default_factory=lambda: ["logs/*.log*"])
    sources: Annotated[list[LogSource], Meta(max_length=64)] = field(default_factory=list)
    checkpoint_path: Text = "state/exporter-offsets.json"
    checkpoint_interval_s: Seconds = 1.0
    poll_interval_s: Seconds = 2.0
    min_pass_interval_s: Annotated[float, Meta(ge=0, le=60)] = 0.25
    max_line_bytes: Annotated[int, Meta(gt=0, le=64 << 20)] = 65536
    read_chunk_bytes: Annotated[int, Meta(gt=0, le=256 << 20)] = 1 << 20
    aliases: AliasConfig = field(default_factory=AliasConfig)

    def formats(self) -> list[tuple[str, LogFormat]]:
        """(glob, format) of every tailed path, ``sources`` first so that a file matched by a
        source and by ``paths`` takes the source's format; ``paths`` are ``auto``."""
        return [(path, source.format) for source in self.sources for path in source.paths] \
            + [(path, "auto") for path in self.paths]

    def tailed_paths(self) -> list[str]:
        """Every glob to tail, of whatever format."""
        return [path for path, _ in self.formats()]


DEFAULT_DURATION_BUCKETS_S = [
    0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
]
DEFAULT_TEXT_LENGTH_BUCKETS = [10, 25, 50, 100, 200, 400, 800, 1600, 2048, 4096]


class MetricsConfig(Schema, frozen=True):
    """Bounds on series whose labels come from logs, and histogram buckets for log-derived
    metrics. The bounds make the most ``/metrics`` can grow from log content a fixed number
    (``SidecarMetrics.log_derived_bound_bytes``)."""

    label_value_cap: Annotated[int, Meta(gt=0, le=10_000)] = 50
    label_value_max_bytes: Annotated[int, Meta(gt=0, le=4096)] = 128
    max_series_per_family: Annotated[int, Meta(gt=0, le=100_000)] = 300
    duration_buckets_s: Buckets = field(default_factory=lambda: list(DEFAULT_DURATION_BUCKETS_S))
    text_length_buckets: Buckets = field(
        default_factory=lambda: [float(b) for b in DEFAULT_TEXT_LENGTH_BUCKETS])

    def __post_init__(self) -> None:
        rules(duration_buckets_s=increasing(self.duration_buckets_s),
              text_length_buckets=increasing(self.text_length_buckets))


def _gpu_source(value: str) -> str | None:
    if value not in ("nvml", "none") and not (value.startswith("file:") and len(value) > 5):
        return f"expected 'nvml', 'none' or 'file:PATH', got {value!r:.60}"
    return None


def _gpu_devices(value: str | list[str | int]) -> str | None:
    """``auto``, ``all``, or each GPU once by UUID or index."""
    if (isinstance(value, str) and value not in ("auto", "all")) or not value:
        return ("expected 'auto', 'all' or a non-empty list of GPU UUIDs or indices, "
                f"got {value!r:.60}")
    if isinstance(value, list) and not all(
            (isinstance(v, str) and v.strip() and len(v) <= 128)
            or (isinstance(v, int) and 0 <= v <= 1_000_000) for v in value):
        return "expected GPU UUIDs (GPU-..., MIG-...) or indices >= 0"
    if isinstance(value, list) and len({str(v).strip() for v in value}) != len(value):
        return "expected each GPU once"
    return None


class GpuConfig(Schema, frozen=True):
    """Where GPU readings come from: ``nvml``, ``file:PATH`` (JSON re-read each poll), ``none``;
    and which GPUs the gate and the ``tts_gpu_*`` series follow: ``all``, a list of UUIDs or
    indices, or ``auto`` (the CUDA devices the probed app reports; all without a probe)."""

    source: Text = "nvml"
    poll_interval_s: Seconds = 0.25
    stale_after_s: Seconds = 2.0
    devices: str | Annotated[list[str | int], Meta(max_length=1024)] = "auto"

    def __post_init__(self) -> None:
        rules(source=_gpu_source(self.source), devices=_gpu_devices(self.devices))

    def device_list(self) -> str | list[str]:
        """``gpu.devices`` with list entries as strings (indices and UUIDs alike)."""
        return self.devices if isinstance(self.devices, str) else [str(d) for d in self.devices]


class GateConfig(Schema, frozen=True):
    """The ingress gate: close above ``close_at``, reopen below ``reopen_below`` held for
    ``reopen_after_s``. ``on_gpu_failure`` says what a failed or stale GPU reading does:
    ``close`` (fail safe), ``hold`` (keep the last decision) or ``ignore`` (treat as healthy)."""

    enabled: bool = True
    close_at: Ratio = 0.90
    reopen_below: Ratio = 0.85
    reopen_after_s: Annotated[float, Meta(ge=0, le=86400)] = 30.0
    on_gpu_failure: Literal["close", "hold", "ignore"] = "hold"
    mode: Literal["readiness", "auth_request"] = "readiness"
    retry_after_s: Annotated[int, Meta(gt=0, le=86400)] = 5
    gate_file: Text = "state/ingress.json"

    def __post_init__(self) -> None:
        rules(reopen_below=None if self.reopen_below <= self.close_at else
              "expected a value <= gate.close_at (hysteresis)")


class AuthConfig(Schema, frozen=True):
    """Bearer token for the Alertmanager webhook and the manual override.

    ``bearer_token_file`` wins over ``bearer_token``; with neither, those routes answer 403.
    """

    bearer_token: Text = ""
    bearer_token_file: Text = ""

    def token(self) -> str:
        if self.bearer_token_file:
            return Path(self.bearer_token_file).read_text(encoding="utf-8").strip()
        return self.bearer_token


class DiskConfig(Schema, frozen=True):
    """Cache directories to watch: filesystem free space and the directory's own size."""

    paths: Globs = field(default_factory=list)
    thresholds: Annotated[list[Annotated[float, Meta(gt=0, le=1)]], Meta(max_length=16)] = \
        field(default_factory=lambda: [0.85, 0.90, 0.95])
    reconcile_interval_s: Seconds = 60.0
    poll_interval_s: Seconds = 5.0

    def __post_init__(self) -> None:
        rules(thresholds=increasing(self.thresholds))


class ProbeConfig(Schema, frozen=True):
    """The app's ``/status`` endpoint, polled for queue depth and restarts; empty url = off."""

    url: Text = ""
    interval_s: Seconds = 1.0
    timeout_s: Seconds = 1.0


class TimelinesConfig(Schema, frozen=True):
    """What the live sidecar keeps for ``/requests``: the newest record lines that carry a
    request id, bounded in lines and in bytes (a line longer than ``max_line_chars`` characters
    is kept shortened), how many records one timeline shows, the most requests one list
    returns, and which fields a timeline shows (empty: all)."""

    enabled: bool = True
    max_lines: Annotated[int, Meta(gt=0, le=1_000_000)] = 10_000
    max_bytes: Annotated[int, Meta(gt=0, le=1 << 30)] = 4 << 20
    max_line_chars: Annotated[int, Meta(ge=256, le=1 << 20)] = 2048
    max_records_per_request: Annotated[int, Meta(gt=0, le=100_000)] = 64
    max_list_limit: Annotated[int, Meta(gt=0, le=100_000)] = 1000
    fields: Names = field(default_factory=list)


class Config(Schema, frozen=True):
    """The whole sidecar configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    timelines: TimelinesConfig = field(default_factory=TimelinesConfig)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; raise :class:`ConfigError` listing every problem.

    Relative paths inside the file stay relative to the working directory, as operators expect
    from a sidecar started next to the service it watches.
    """
    return load_file(Config, path)


def config_from_mapping(data: Any, file: str = "<config>") -> Config:
    """Validate an already-parsed mapping (what :func:`load_config` does after YAML)."""
    return from_mapping(Config, data, file)
