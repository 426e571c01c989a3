"""Where jobs, Idempotency-Keys and finished audio live: this process, or Redis for a fleet.

``store.url: local`` keeps today's single-replica behaviour (nothing here is consulted).
A Redis URL shares jobs, keys and audio between replicas (:mod:`.redis_store`); every Redis
call is bounded, and a failed one falls back to the replica's own state (counted, logged once
per outage, reported in ``/status``), so Redis being down costs sharing, never a request.
"""

from __future__ import annotations

from tts_app.config import StoreConfig
from tts_app.logging import StructuredLog
from tts_app.store.base import LocalStore, Store
from tts_app.store.redis_store import RedisStore


def open_store(config: StoreConfig, log: StructuredLog) -> Store:
    """The store ``config.url`` names; connecting is lazy (Redis down at start-up is a
    fallback like any other, not a failed start)."""
    if config.url == "local":
        return LocalStore()
    return RedisStore(config, log)


__all__ = ["LocalStore", "RedisStore", "Store", "open_store"]
