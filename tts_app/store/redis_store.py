"""The Redis store: bounded calls, a short circuit-breaker, and counted fallbacks.

Every call is cut off after ``timeout_s``. A failed call (refused, timeout, broken reply)
marks Redis unhealthy for ``retry_interval_s``: calls in that window are not tried at all, so
an outage costs each request nothing but the fallback, and the first call after it tells
whether Redis is back. The outage is logged once when it starts (``store_unavailable``) and
once when it ends (``store_recovered``); every call answered by the fallback is counted.
A value of the wrong Redis type under one of our keys (someone else wrote it) is a miss,
counted and logged as ``store_bad_value``, never an error for the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from tts_app.config import StoreConfig
from tts_app.logging import StructuredLog

T = TypeVar("T")
_DOWN = object()     # the call was not answered by Redis
# Compare-and-act on a lease: only its holder may renew or release it (a lease that lapsed
# and was taken by another replica is that replica's now).
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")
# A cache entry written under a byte budget, atomically: KEYS = the index (sorted set: entry
# name by expiry time), the sizes (hash: entry name -> bytes) and the running total; ARGV =
# entry name, body, TTL in ms, budget. Entries past their TTL leave the index first, then the
# oldest go until the total fits. The entry names come in ARGV, so this needs a standalone
# Redis (or one shard), not a cluster.
_PUT_BOUNDED = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local function forget(name)
  local size = tonumber(redis.call('HGET', KEYS[2], name) or '0')
  redis.call('HDEL', KEYS[2], name)
  redis.call('ZREM', KEYS[1], name)
  redis.call('DECRBY', KEYS[3], size)
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)) do forget(name) end
forget(ARGV[1])
local ttl = tonumber(ARGV[3])
redis.call('SET', ARGV[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], string.len(ARGV[2]))
local total = redis.call('INCRBY', KEYS[3], string.len(ARGV[2]))
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest then break end
  redis.call('DEL', oldest)
  forget(oldest)
  total = tonumber(redis.call('GET', KEYS[3]))
end
for i = 1, 3 do  -- the index lives as long as its longest-lived entry
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return total
"""


class RedisStore:
    kind = "redis"
    shared = True

    def __init__(self, config: StoreConfig, log: StructuredLog,
                 clock: Callable[[], float] = time.monotonic, client: Redis | None = None) -> None:
        self._config = config
        self._log = log
        self._clock = clock
        # No client-side retries: the fallback is the retry, and a retry would double the
        # time a request waits on a dead Redis.
        self._redis = client or Redis.from_url(
            config.url, socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s, retry=Retry(NoBackoff(), 0))
        self._token = uuid.uuid4().hex.encode()     # this process's name on its leases
        self._down_until = 0.0
        self.healthy = True
        self.fallbacks_total = 0
        self.bad_values_total = 0

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "healthy": self.healthy,
                "fallbacks_total": self.fallbacks_total,
                "bad_values_total": self.bad_values_total}

    def count_bad_value(self, key: str, problem: str) -> None:
        self.bad_values_total += 1
        self._log.event("store_bad_value", level="WARNING", warning_code="STORE_BAD_VALUE",
                        key=key[:200], message=f"{problem}; treated as a miss")

    async def _call(self, key: str, op: Callable[[], Awaitable[T]]) -> T | object:
        """``op()``'s answer, or _DOWN (counted) when Redis is down, slow or skipped."""
        if self._clock() < self._down_until:
            self.fallbacks_total += 1
            return _DOWN
        try:
            result = await asyncio.wait_for(op(), self._config.timeout_s)
        except ResponseError as exc:        # WRONGTYPE: not our value under our key
            self.count_bad_value(key, f"{type(exc).__name__}: {exc}")
            return _DOWN
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.fallbacks_total += 1
            self._down_until = self._clock() + self._config.retry_interval_s
            if self.healthy:
                self.healthy = False
                # pooled connections to the Redis that failed would each fail once more
                # when it is back; they go now, so the first call after the outage is clean
                with contextlib.suppress(RedisError, OSError):
                    await self._redis.connection_pool.disconnect()
                self._log.event("store_unavailable", level="WARNING",
                                warning_code="STORE_UNAVAILABLE", store=self.kind,
                                message=f"{type(exc).__name__}: {exc}; jobs, keys and the cache "
                                        "fall back to this replica until it answers")
            return _DOWN
        if not self.healthy:
            self.healthy = True
            self._log.event("store_recovered", store=self.kind)
        return result

    def _key(self, key: str) -> str:
        return self._config.key_prefix + key

    async def get(self, key: str) -> bytes | None:
        name = self._key(key)
        value = await self._call(name, lambda: self._redis.get(name))
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_s: float, only_new: bool = False) -> bool:
        name = self._key(key)
        done = await self._call(name, lambda: self._redis.set(
            name, value, px=max(1, int(ttl_s * 1000)), nx=only_new))
        return done is True

    async def put_bounded(self, key: str, value: bytes, ttl_s: float, budget: str,
                          max_bytes: int) -> None:
        name = self._key(key)
        keys = [self._key(f"{budget}:{part}") for part in ("index", "sizes", "total")]
        await self._call(name, lambda: self._redis.eval(
            _PUT_BOUNDED, 3, *keys, name, value, max(1, int(ttl_s * 1000)), max_bytes))

    async def delete(self, key: str) -> None:
        name = self._key(key)
        await self._call(name, lambda: self._redis.delete(name))

    async def take_lease(self, key: str, ttl_s: float) -> bool:
        name = self._key(key)
        taken = await self._call(name, lambda: self._redis.set(
            name, self._token, px=max(1, int(ttl_s * 1000)), nx=True))
        return taken is not None     # True (ours), or _DOWN: go ahead without one

    async def renew_lease(self, key: str, ttl_s: float) -> None:
        name = self._key(key)
        await self._call(name, lambda: self._redis.eval(
            _RENEW, 1, name, self._token, max(1, int(ttl_s * 1000))))

    async def release_lease(self, key: str) -> None:
        name = self._key(key)
        await self._call(name, lambda: self._redis.eval(_RELEASE, 1, name, self._token))

    async def exists(self, key: str) -> bool:
        name = self._key(key)
        return await self._call(name, lambda: self._redis.exists(name)) == 1

    async def close(self) -> None:
        await self._redis.aclose()
