"""The app's configuration: YAML in, frozen typed value objects out.

Anything wrong stops start-up with a :class:`ConfigError` listing every problem, each naming
the file, the dotted key and what was expected, e.g. ``config/app.yaml: admission.queue_size:
expected an integer, got 'big'``. The :class:`~tts_app.schema.Schema` structs below are the
schema: adding a setting is one line, ``name: Type = default`` with its bound
(``Annotated[int, Meta(ge=..., le=...)]``); a new section is a struct plus one line in
:class:`AppConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta, field

from tts_app.identity import parse_network
from tts_app.schema import ConfigError as ConfigError
from tts_app.schema import Schema, from_mapping, listen_address, load_file, rules


def _networks(value: list[str]) -> str | None:
    for text in value:
        try:
            parse_network(text)
        except ValueError:
            return f"expected IP addresses or CIDR networks (e.g. 10.0.0.0/8); {text!r} is not one"
    return None


# The largest values that still make sense: a typo of a few zeros stops start-up instead of
# exhausting memory or waiting for ever later.
Seconds = Annotated[float, Meta(le=86400)]
Text = Annotated[str, Meta(max_length=4096)]
Options = Annotated[dict[str, Any], Meta(max_length=64)]


class ServerConfig(Schema, frozen=True):
    listen: Text = "127.0.0.1:8080"
    max_body_bytes: Annotated[int, Meta(ge=1024, le=1 << 30)] = 65536
    # SIGTERM: how long in-flight work may take before the process exits anyway.
    drain_timeout_s: Annotated[Seconds, Meta(ge=0)] = 30.0
    # A connection that has not sent a complete request head within this closes (idle
    # keep-alive connections too); above nginx's upstream keepalive_timeout (60 s), so a
    # pooled connection is never closed under the proxy.
    header_timeout_s: Annotated[Seconds, Meta(ge=0.1)] = 75.0
    # A request body not received in full within this is 408 REQUEST_TIMEOUT: a slow upload
    # holds no handler, and no shutdown, for longer.
    body_timeout_s: Annotated[Seconds, Meta(ge=0.1)] = 10.0

    def __post_init__(self) -> None:
        rules(listen=listen_address(self.listen, lowest_port=0))

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class LogConfig(Schema, frozen=True):
    path: Text = "logs/tts-app.log"
    format: Literal["json", "text"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    logger: Annotated[str, Meta(max_length=256)] = "tts_app"
    # Size rotation: past max_bytes the file is renamed to PATH.1 (PATH.1 -> PATH.2 ... up to
    # backups, the oldest dropped); 0 = never rotate (an outside logrotate may still).
    max_bytes: Annotated[int, Meta(ge=0, le=1 << 40)] = 100 << 20
    backups: Annotated[int, Meta(ge=1, le=1000)] = 5
    # Records are written by a thread in batches: at most this long after they were logged.
    flush_interval_s: Annotated[float, Meta(ge=0.001, le=1)] = 0.1
    # Records waiting for the writer; beyond it (the disk far slower than the app) a record
    # is counted as lost (log_write_errors) rather than held.
    buffer_max_bytes: Annotated[int, Meta(ge=65536, le=1 << 30)] = 16 << 20


class BackendConfig(Schema, frozen=True):
    name: Literal["espeak", "chattts"] = "espeak"
    # Keyword arguments for the backend's constructor, per backend name (the backend checks
    # them when it is built).
    espeak: Options = field(default_factory=dict)
    chattts: Options = field(default_factory=dict)
    warmup_text: Text = "Warm-up."
    # Per-synthesis wall-clock limit; beyond it the request fails with MODEL_ERROR and the
    # instance it holds is taken out of service (its thread cannot be stopped).
    timeout_s: Annotated[Seconds, Meta(ge=0.1)] = 120.0
    # Replacements are loaded only while at most this many timed-out syntheses still hold
    # their instance (each holds its memory); beyond it capacity shrinks, and with no
    # instance left /healthz answers 503 so the orchestrator restarts the process.
    max_hung_instances: Annotated[int, Meta(ge=0, le=1000)] = 1

    def options(self) -> dict[str, Any]:
        return dict(self.espeak if self.name == "espeak" else self.chattts)


class LimitsConfig(Schema, frozen=True):
    text_max_chars: Annotated[int, Meta(ge=1, le=1_000_000)] = 2000
    languages: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=256)] = \
        field(default_factory=lambda: ["en", "zh"])


Rate = Annotated[float, Meta(ge=0.001, le=1e6)]
Burst = Annotated[float, Meta(ge=1, le=1e6)]


class RateLimitConfig(Schema, frozen=True):
    enabled: bool = True
    rate_per_s: Rate = 50.0
    burst: Burst = 100.0
    max_clients: Annotated[int, Meta(ge=1, le=10_000_000)] = 10000
    # One bucket for all clients together, checked after the client's own: the ceiling that
    # many addresses cannot get around.
    global_rate_per_s: Rate = 600.0
    global_burst: Burst = 600.0


class IdentityConfig(Schema, frozen=True):
    # Peers whose X-Forwarded-For and client_header are believed (the shipped nginx).
    trusted_proxies: Annotated[list[Text], Meta(max_length=1024)] = \
        field(default_factory=lambda: ["127.0.0.1", "::1"])
    # Set by a trusted proxy that authenticated the caller (API key, tenant).
    client_header: Annotated[str, Meta(min_length=1, max_length=256)] = "X-Client-ID"

    def __post_init__(self) -> None:
        rules(trusted_proxies=_networks(self.trusted_proxies))


class AdmissionConfig(Schema, frozen=True):
    # Requests allowed to wait for a model instance; beyond it -> 429 QUEUE_FULL.
    queue_size: Annotated[int, Meta(ge=0, le=1_000_000)] = 16
    retry_after_s: Annotated[int, Meta(ge=1, le=86400)] = 1
    # A 429 QUEUE_FULL / RATE_LIMITED is answered this long after the request arrived (the
    # request holds no slot meanwhile): caps how fast a client that ignores Retry-After can
    # make the app refuse it, so shedding cannot starve the admitted work. 0 = at once.
    shed_delay_s: Annotated[float, Meta(ge=0, le=10)] = 0.5
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)


class CacheConfig(Schema, frozen=True):
    enabled: bool = True
    dir: Text = "cache"
    max_bytes: Annotated[int, Meta(ge=0, le=1 << 50)] = 1 << 30
    # Hot entries kept in memory so a repeated text costs no disk read.
    memory_max_bytes: Annotated[int, Meta(ge=0, le=1 << 40)] = 64 << 20


class AudioConfig(Schema, frozen=True):
    # Audio whose RMS is below this is logged as a WARNING with warning_code=AUDIO_SILENT
    # and not cached (a model producing silence is broken, not quiet). 0 disables the check.
    silence_rms: Annotated[float, Meta(ge=0, le=1)] = 0.001


class GateConfig(Schema, frozen=True):
    file: Text = "state/ingress.json"
    # The file is stat()ed at most this often; re-read only when mtime/size changed.
    check_interval_s: Annotated[float, Meta(ge=0, le=3600)] = 0.25
    default_retry_after_s: Annotated[int, Meta(ge=1, le=86400)] = 30


class JobsConfig(Schema, frozen=True):
    max_pending: Annotated[int, Meta(ge=1, le=1_000_000)] = 64
    max_kept: Annotated[int, Meta(ge=1, le=10_000_000)] = 1000
    ttl_s: Annotated[Seconds, Meta(ge=1)] = 3600.0
    max_bytes: Annotated[int, Meta(ge=0, le=1 << 40)] = 256 << 20   # finished jobs' audio


class BatchConfig(Schema, frozen=True):
    # Concurrent compatible requests sharing one model call (backends that batch: chattts);
    # 1 turns batching off. Each model instance then runs up to this many requests at once.
    max_size: Annotated[int, Meta(ge=1, le=64)] = 8
    # How long the first request of a batch waits for others before the call starts.
    max_wait_ms: Annotated[float, Meta(ge=0, le=1000)] = 10.0


def _store_url(value: str) -> str | None:
    if value == "local" or value.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "expected local or a Redis URL (redis://HOST:PORT/DB, rediss://..., unix://...)"


class StoreConfig(Schema, frozen=True):
    # local: jobs, Idempotency-Keys and the cache live in this process (one replica);
    # a Redis URL shares them between replicas (tts_app.store).
    url: Text = "local"
    # Every Redis call is abandoned after this; the request then goes on with local state.
    timeout_s: Annotated[float, Meta(ge=0.001, le=60)] = 0.25
    # After a failed call Redis is left alone this long, so an outage costs no timeouts.
    retry_interval_s: Annotated[float, Meta(ge=0.01, le=3600)] = 2.0
    cache_ttl_s: Annotated[int, Meta(ge=1, le=365 * 86400)] = 86400
    # The shared audio together stays within this (the oldest entries go first); a body
    # larger than cache_max_entry_bytes is not shared at all.
    cache_max_bytes: Annotated[int, Meta(ge=1024, le=1 << 50)] = 1 << 30
    cache_max_entry_bytes: Annotated[int, Meta(ge=1024, le=1 << 30)] = 8 << 20
    # The lease on a cache key held by the replica synthesizing it, renewed while it runs:
    # a replica that dies lets its waiters take over within this.
    lease_s: Annotated[float, Meta(ge=0.1, le=3600)] = 5.0
    # How long a request waits for another replica's synthesis of the same audio before
    # synthesizing it locally.
    wait_s: Annotated[float, Meta(ge=0, le=86400)] = 120.0
    poll_interval_s: Annotated[float, Meta(ge=0.005, le=60)] = 0.05
    key_prefix: Annotated[str, Meta(max_length=256)] = "tts:"

    def __post_init__(self) -> None:
        rules(url=_store_url(self.url))


class AppConfig(Schema, frozen=True):
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
    """Read and validate a YAML config file; raise :class:`ConfigError` listing every problem."""
    return load_file(AppConfig, path)


def config_from_mapping(data: Any, file: str = "<config>") -> AppConfig:
    return from_mapping(AppConfig, data, file)
