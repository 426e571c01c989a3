"""The sidecar's configuration: YAML in, frozen typed value objects out.

Loaded once at start-up. Anything wrong stops start-up with a :class:`ConfigError` that names
the file, the dotted key and what was expected, e.g.::

    config/exporter.yaml: gate.close_at: expected a number between 0 and 1, got 'high'

The schema is the dataclasses below: their field types drive the validation (see
:func:`_convert`), so adding a setting is adding a typed field with a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and what was expected."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + problem)


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "expected a number between 0 and 1"


def _positive(value: float) -> str | None:
    return None if value > 0 else "expected a number greater than 0"


def _host_port(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "expected HOST:PORT, e.g. 127.0.0.1:9109"
    return None


def _check(check: typing.Callable[[Any], str | None]) -> dict[str, Any]:
    """Field metadata: a check that returns a problem description, or None when fine."""
    return {"check": check}


@dataclass(frozen=True)
class ServerConfig:
    """Where the sidecar's HTTP server listens, and how it protects itself.

    ``web_config_file``: an exporter-toolkit web config (TLS, basic auth), applied to every
    GET route except ``unauthenticated_paths``. A request must send its head within
    ``read_header_timeout_s`` of connecting (or of its previous response) and its body within
    ``read_body_timeout_s``; at most ``max_connections`` connections are open at once.
    """

    listen: str = field(default="127.0.0.1:9109", metadata=_check(_host_port))
    web_config_file: str = ""
    unauthenticated_paths: list[str] = field(default_factory=lambda: ["/ingress", "/healthz"])
    max_body_bytes: int = field(default=65536, metadata=_check(_positive))
    read_header_timeout_s: float = field(default=5.0, metadata=_check(_positive))
    read_body_timeout_s: float = field(default=10.0, metadata=_check(_positive))
    max_connections: int = field(default=256, metadata=_check(_positive))

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


@dataclass(frozen=True)
class AliasConfig:
    """Field and event names that other TTS services use for the contract's names."""

    fields: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_FIELD_ALIASES))
    events: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_EVENT_ALIASES))


LogFormat = Literal["auto", "app", "gateway"]


@dataclass(frozen=True)
class LogSource:
    """Log files of one known format: ``app`` (the log contract, text or JSON lines),
    ``gateway`` (the reverse proxy's JSON access log, config/nginx/tts.conf), ``auto``
    (decided per file from its first record line)."""

    paths: list[str] = field(default_factory=list)
    format: LogFormat = "auto"


@dataclass(frozen=True)
class LogsConfig:
    """Which log files to tail and how."""

    paths: list[str] = field(default_factory=lambda: ["logs/*.log*"])
    sources: list[LogSource] = field(default_factory=list)
    checkpoint_path: str = "state/exporter-offsets.json"
    checkpoint_interval_s: float = field(default=1.0, metadata=_check(_positive))
    poll_interval_s: float = field(default=2.0, metadata=_check(_positive))
    max_line_bytes: int = field(default=65536, metadata=_check(_positive))
    read_chunk_bytes: int = field(default=1 << 20, metadata=_check(_positive))
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


@dataclass(frozen=True)
class MetricsConfig:
    """Bounds on series whose labels come from logs, and histogram buckets for log-derived
    metrics. The bounds make the most ``/metrics`` can grow from log content a fixed number
    (``SidecarMetrics.log_derived_bound_bytes``)."""

    label_value_cap: int = field(default=50, metadata=_check(_positive))
    label_value_max_bytes: int = field(default=128, metadata=_check(_positive))
    max_series_per_family: int = field(default=300, metadata=_check(_positive))
    duration_buckets_s: list[float] = field(
        default_factory=lambda: list(DEFAULT_DURATION_BUCKETS_S)
    )
    text_length_buckets: list[float] = field(
        default_factory=lambda: [float(b) for b in DEFAULT_TEXT_LENGTH_BUCKETS]
    )


def _gpu_devices(value: str | list[str | int]) -> str | None:
    if isinstance(value, str):
        return None
    entries = [str(v).strip() for v in value]
    if not entries:
        return "expected 'all', 'auto' or a non-empty list of GPU UUIDs or indices"
    if any(isinstance(v, int) and v < 0 for v in value) or not all(entries):
        return "expected GPU UUIDs (GPU-..., MIG-...) or indices >= 0"
    if len(set(entries)) != len(entries):
        return "expected each GPU once"
    return None


@dataclass(frozen=True)
class GpuConfig:
    """Where GPU readings come from: ``nvml``, ``file:PATH`` (JSON re-read each poll), ``none``;
    and which GPUs the gate and the ``tts_gpu_*`` series follow: ``all``, a list of UUIDs or
    indices, or ``auto`` (the CUDA devices the probed app reports; all without a probe)."""

    source: str = "nvml"
    poll_interval_s: float = field(default=0.25, metadata=_check(_positive))
    stale_after_s: float = field(default=2.0, metadata=_check(_positive))
    devices: Literal["auto", "all"] | list[str | int] = field(
        default="auto", metadata=_check(_gpu_devices))

    def __post_init__(self) -> None:
        if self.source not in ("nvml", "none") and not (
            self.source.startswith("file:") and len(self.source) > 5
        ):
            raise ValueError(("source", "expected 'nvml', 'none' or 'file:PATH'"))

    def device_list(self) -> str | list[str]:
        """``gpu.devices`` with list entries as strings (indices and UUIDs alike)."""
        return self.devices if isinstance(self.devices, str) else [str(d) for d in self.devices]


@dataclass(frozen=True)
class GateConfig:
    """The ingress gate: close above ``close_at``, reopen below ``reopen_below`` held for
    ``reopen_after_s``. ``on_gpu_failure`` says what a failed or stale GPU reading does:
    ``close`` (fail safe), ``hold`` (keep the last decision) or ``ignore`` (treat as healthy)."""

    enabled: bool = True
    close_at: float = field(default=0.90, metadata=_check(_unit_interval))
    reopen_below: float = field(default=0.85, metadata=_check(_unit_interval))
    reopen_after_s: float = field(default=30.0, metadata=_check(lambda v: None if v >= 0
                                                                   else "expected >= 0"))
    on_gpu_failure: Literal["close", "hold", "ignore"] = "hold"
    mode: Literal["readiness", "auth_request"] = "readiness"
    retry_after_s: int = field(default=5, metadata=_check(_positive))
    gate_file: str = "state/ingress.json"

    def __post_init__(self) -> None:
        if self.reopen_below > self.close_at:
            raise ValueError(("reopen_below", "expected a value <= gate.close_at (hysteresis)"))


@dataclass(frozen=True)
class AuthConfig:
    """Bearer token for the Alertmanager webhook and the manual override.

    ``bearer_token_file`` wins over ``bearer_token``; with neither, those routes answer 403.
    """

    bearer_token: str = ""
    bearer_token_file: str = ""

    def token(self) -> str:
        if self.bearer_token_file:
            return Path(self.bearer_token_file).read_text(encoding="utf-8").strip()
        return self.bearer_token


@dataclass(frozen=True)
class DiskConfig:
    """Cache directories to watch: filesystem free space and the directory's own size."""

    paths: list[str] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=lambda: [0.85, 0.90, 0.95])
    reconcile_interval_s: float = field(default=60.0, metadata=_check(_positive))
    poll_interval_s: float = field(default=5.0, metadata=_check(_positive))


@dataclass(frozen=True)
class ProbeConfig:
    """The app's ``/status`` endpoint, polled for queue depth and restarts; empty url = off."""

    url: str = ""
    interval_s: float = field(default=1.0, metadata=_check(_positive))
    timeout_s: float = field(default=1.0, metadata=_check(_positive))


@dataclass(frozen=True)
class TimelinesConfig:
    """What the live sidecar keeps for ``/requests``: the newest record lines that carry a
    request id, bounded in lines and in bytes (a line longer than ``max_line_chars`` characters
    is kept shortened), how many records one timeline shows, the most requests one list
    returns, and which fields a timeline shows (empty: all)."""

    enabled: bool = True
    max_lines: int = field(default=10_000, metadata=_check(_positive))
    max_bytes: int = field(default=4 << 20, metadata=_check(_positive))
    max_line_chars: int = field(default=2048, metadata=_check(lambda v: None if v >= 256
                                                              else "expected >= 256"))
    max_records_per_request: int = field(default=64, metadata=_check(_positive))
    max_list_limit: int = field(default=1000, metadata=_check(_positive))
    fields: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Config:
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
    """Read and validate a YAML config file; raise :class:`ConfigError` on any problem.

    Relative paths inside the file stay relative to the working directory, as operators expect
    from a sidecar started next to the service it watches.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read the file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(name, "", f"{where}not valid YAML ({getattr(exc, 'problem', exc)})") \
            from None
    return config_from_mapping({} if data is None else data, name)


def config_from_mapping(data: Any, file: str = "<config>") -> Config:
    """Validate an already-parsed mapping (what :func:`load_config` does after YAML)."""
    result = _convert(Config, data, file, "")
    assert isinstance(result, Config)
    return result


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(tp: Any, value: Any, file: str, key: str) -> Any:
    """Turn ``value`` into type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, file, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(file, key, f"expected one of {', '.join(map(repr, choices))}, "
                                         f"got {_describe(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        problems = []
        for arg in args:  # the first alternative that takes the value
            try:
                return _convert(arg, value, file, key)
            except ConfigError as exc:
                problems.append(exc.problem if exc.key == key else f"{exc.key}: {exc.problem}")
        raise ConfigError(file, key, "; or ".join(problems))
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected a list, got {_describe(value)}")
        return [_convert(item_tp, v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(file, key, f"expected a mapping, got {_describe(value)}")
        return {_convert(key_tp, k, file, key): _convert(val_tp, v, file, f"{key}.{k}")
                for k, v in value.items()}
    return _convert_scalar(tp, value, file, key)


def _convert_scalar(tp: Any, value: Any, file: str, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(file, key, f"expected true or false, got {_describe(value)}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            tp is int and not float(value).is_integer()
        ):
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(file, key, f"expected {kind}, got {_describe(value)}")
        return tp(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(file, key, f"expected a string, got {_describe(value)}")
    raise TypeError(f"config schema uses unsupported type {tp!r} at {key}")


def _convert_dataclass(cls: Any, value: Any, file: str, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(file, key or "(top level)", f"expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, value)) - set(known))
    if unknown:
        raise ConfigError(file, _join(key, unknown[0]),
                          f"unknown key; expected one of {', '.join(sorted(known))}")
    kwargs = {}
    for name, value_in in value.items():
        sub = _join(key, name)
        converted = _convert(hints[name], value_in, file, sub)
        check = known[name].metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            raise ConfigError(file, sub, f"{problem}, got {_describe(value_in)}")
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except ValueError as exc:
        field_name, problem = exc.args[0]
        raise ConfigError(file, _join(key, field_name), problem) from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
