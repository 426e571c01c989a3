"""The app's configuration: YAML in, frozen typed value objects out.

Anything wrong stops start-up with a :class:`ConfigError` naming the file, the dotted key and
what was expected, e.g. ``config/app.yaml: admission.queue_size: expected an integer >= 0,
got 'big'``. The dataclasses are the schema: their field types drive validation, so adding a
setting is adding a typed field with a default. (``tts_app`` never imports ``exporter``, so
this is the app's own small loader.)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tts_app.identity import parse_network


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and what was expected."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


Check = Callable[[Any], "str | None"]


def _at_least(minimum: float) -> dict[str, Check]:
    return {"check": lambda v: None if v >= minimum else f"expected a value >= {minimum}"}


def _host_port(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return "expected HOST:PORT, e.g. 127.0.0.1:8080"
    return None


def _networks(value: list[str]) -> str | None:
    for text in value:
        try:
            parse_network(text)
        except ValueError:
            return f"expected IP addresses or CIDR networks (e.g. 10.0.0.0/8); {text!r} is not one"
    return None


@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(default="127.0.0.1:8080", metadata={"check": _host_port})
    max_body_bytes: int = field(default=65536, metadata=_at_least(1024))
    # SIGTERM: how long in-flight work may take before the process exits anyway.
    drain_timeout_s: float = field(default=30.0, metadata=_at_least(0))
    # A connection that has not sent a complete request head within this closes (idle
    # keep-alive connections too); above nginx's upstream keepalive_timeout (60 s), so a
    # pooled connection is never closed under the proxy.
    header_timeout_s: float = field(default=75.0, metadata=_at_least(0.1))
    # A request body not received in full within this is 408 REQUEST_TIMEOUT: a slow upload
    # holds no handler, and no shutdown, for longer.
    body_timeout_s: float = field(default=10.0, metadata=_at_least(0.1))

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True)
class LogConfig:
    path: str = "logs/tts-app.log"
    format: Literal["json", "text"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    logger: str = "tts_app"
    # Size rotation: past max_bytes the file is renamed to PATH.1 (PATH.1 -> PATH.2 ... up to
    # backups, the oldest dropped); 0 = never rotate (an outside logrotate may still).
    max_bytes: int = field(default=100 << 20, metadata=_at_least(0))
    backups: int = field(default=5, metadata=_at_least(1))
    # Records are written by a thread in batches: at most this long after they were logged.
    flush_interval_s: float = field(default=0.1, metadata={
        "check": lambda v: None if 0.001 <= v <= 1 else "expected a value in [0.001, 1]"})
    # Records waiting for the writer; beyond it (the disk far slower than the app) a record
    # is counted as lost (log_write_errors) rather than held.
    buffer_max_bytes: int = field(default=16 << 20, metadata=_at_least(65536))


@dataclass(frozen=True)
class BackendConfig:
    name: Literal["espeak", "chattts"] = "espeak"
    # Keyword arguments for the backend's constructor, per backend name.
    espeak: dict[str, Any] = field(default_factory=dict)
    chattts: dict[str, Any] = field(default_factory=dict)
    warmup_text: str = "Warm-up."
    # Per-synthesis wall-clock limit; beyond it the request fails with MODEL_ERROR and the
    # instance it holds is taken out of service (its thread cannot be stopped).
    timeout_s: float = field(default=120.0, metadata=_at_least(0.1))
    # Replacements are loaded only while at most this many timed-out syntheses still hold
    # their instance (each holds its memory); beyond it capacity shrinks, and with no
    # instance left /healthz answers 503 so the orchestrator restarts the process.
    max_hung_instances: int = field(default=1, metadata=_at_least(0))

    def options(self) -> dict[str, Any]:
        return dict(self.espeak if self.name == "espeak" else self.chattts)


@dataclass(frozen=True)
class LimitsConfig:
    text_max_chars: int = field(default=2000, metadata=_at_least(1))
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])


@dataclass(frozen=True)
class RateLimitConfig:
    enabled: bool = True
    rate_per_s: float = field(default=50.0, metadata=_at_least(0.001))
    burst: float = field(default=100.0, metadata=_at_least(1))
    max_clients: int = field(default=10000, metadata=_at_least(1))
    # One bucket for all clients together, checked after the client's own: the ceiling that
    # many addresses cannot get around.
    global_rate_per_s: float = field(default=600.0, metadata=_at_least(0.001))
    global_burst: float = field(default=600.0, metadata=_at_least(1))


@dataclass(frozen=True)
class IdentityConfig:
    # Peers whose X-Forwarded-For and client_header are believed (the shipped nginx).
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"],
                                       metadata={"check": _networks})
    # Set by a trusted proxy that authenticated the caller (API key, tenant).
    client_header: str = "X-Client-ID"


@dataclass(frozen=True)
class AdmissionConfig:
    # Requests allowed to wait for a model instance; beyond it -> 429 QUEUE_FULL.
    queue_size: int = field(default=16, metadata=_at_least(0))
    retry_after_s: int = field(default=1, metadata=_at_least(1))
    # A 429 QUEUE_FULL / RATE_LIMITED is answered this long after the request arrived (the
    # request holds no slot meanwhile): caps how fast a client that ignores Retry-After can
    # make the app refuse it, so shedding cannot starve the admitted work. 0 = at once.
    shed_delay_s: float = field(default=0.5, metadata={
        "check": lambda v: None if 0 <= v <= 10 else "expected a value in [0, 10]"})
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    dir: str = "cache"
    max_bytes: int = field(default=1 << 30, metadata=_at_least(0))
    # Hot entries kept in memory so a repeated text costs no disk read.
    memory_max_bytes: int = field(default=64 << 20, metadata=_at_least(0))


@dataclass(frozen=True)
class AudioConfig:
    # Audio whose RMS is below this is logged as a WARNING with warning_code=AUDIO_SILENT
    # and not cached (a model producing silence is broken, not quiet). 0 disables the check.
    silence_rms: float = field(default=0.001, metadata=_at_least(0))


@dataclass(frozen=True)
class GateConfig:
    file: str = "state/ingress.json"
    # The file is stat()ed at most this often; re-read only when mtime/size changed.
    check_interval_s: float = field(default=0.25, metadata=_at_least(0))
    default_retry_after_s: int = field(default=30, metadata=_at_least(1))


@dataclass(frozen=True)
class JobsConfig:
    max_pending: int = field(default=64, metadata=_at_least(1))
    max_kept: int = field(default=1000, metadata=_at_least(1))
    ttl_s: float = field(default=3600.0, metadata=_at_least(1))
    max_bytes: int = field(default=256 << 20, metadata=_at_least(0))   # finished jobs' audio


def _between(low: float, high: float) -> dict[str, Check]:
    return {"check": lambda v: None if low <= v <= high else f"expected {low} to {high}"}


@dataclass(frozen=True)
class BatchConfig:
    # Concurrent compatible requests sharing one model call (backends that batch: chattts);
    # 1 turns batching off. Each model instance then runs up to this many requests at once.
    max_size: int = field(default=8, metadata=_between(1, 64))
    # How long the first request of a batch waits for others before the call starts.
    max_wait_ms: float = field(default=10.0, metadata=_between(0, 1000))
def _store_url(value: str) -> str | None:
    if value == "local" or value.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "expected local or a Redis URL (redis://HOST:PORT/DB, rediss://..., unix://...)"


@dataclass(frozen=True)
class StoreConfig:
    # local: jobs, Idempotency-Keys and the cache live in this process (one replica);
    # a Redis URL shares them between replicas (tts_app.store).
    url: str = field(default="local", metadata={"check": _store_url})
    # Every Redis call is abandoned after this; the request then goes on with local state.
    timeout_s: float = field(default=0.25, metadata=_at_least(0.001))
    # After a failed call Redis is left alone this long, so an outage costs no timeouts.
    retry_interval_s: float = field(default=2.0, metadata=_at_least(0.01))
    cache_ttl_s: int = field(default=86400, metadata=_at_least(1))
    # The shared audio together stays within this (the oldest entries go first); a body
    # larger than cache_max_entry_bytes is not shared at all.
    cache_max_bytes: int = field(default=1 << 30, metadata=_at_least(1024))
    cache_max_entry_bytes: int = field(default=8 << 20, metadata=_at_least(1024))
    # The lease on a cache key held by the replica synthesizing it, renewed while it runs:
    # a replica that dies lets its waiters take over within this.
    lease_s: float = field(default=5.0, metadata=_at_least(0.1))
    # How long a request waits for another replica's synthesis of the same audio before
    # synthesizing it locally.
    wait_s: float = field(default=120.0, metadata=_at_least(0))
    poll_interval_s: float = field(default=0.05, metadata=_at_least(0.005))
    key_prefix: str = "tts:"


@dataclass(frozen=True)
class AppConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    store: StoreConfig = field(default_factory=StoreConfig)


def load_config(path: str | Path) -> AppConfig:
    """Read and validate a YAML config file; raise :class:`ConfigError` on any problem."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read the file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(name, "", f"not valid YAML ({exc})") from None
    return config_from_mapping({} if data is None else data, name)


def config_from_mapping(data: Any, file: str = "<config>") -> AppConfig:
    result = _convert(AppConfig, data, file, "")
    assert isinstance(result, AppConfig)
    return result


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(tp: Any, value: Any, file: str, key: str) -> Any:
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
        return None if value is None else _convert(args[0], value, file, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected a list, got {_describe(value)}")
        return [_convert(item_tp, v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(file, key, f"expected a mapping, got {_describe(value)}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(file, key, f"expected true or false, got {_describe(value)}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                tp is int and not float(value).is_integer()):
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
    kwargs = {}
    for name, raw in value.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in known:
            raise ConfigError(file, sub, f"unknown key; expected one of {', '.join(sorted(known))}")
        converted = _convert(hints[name], raw, file, sub)
        check = known[name].metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            raise ConfigError(file, sub, f"{problem}, got {_describe(raw)}")
        kwargs[name] = converted
    return cls(**kwargs)
