"""Admission control: who may start a synthesis, and when to say "later" instead of failing.

Three independent checks, all answering with a Retry-After rather than an error or a hang:
- :class:`GateWatcher`: the sidecar's ingress gate file (VRAM pressure) -> 503 INGRESS_CLOSED.
- :class:`RateLimiter`: a token bucket per client -> 429 RATE_LIMITED.
- :class:`Admission`: a semaphore sized to the backend's model instances (the "GPU
  semaphore") plus a bounded waiting line -> 429 QUEUE_FULL instead of pool exhaustion.
Clocks are injected so the bucket and the gate are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tts_app.errors import AppError

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` answers how long to wait (0 = ok)."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._stamp = clock()

    def take(self, cost: float = 1.0) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate


class RateLimiter:
    """Token buckets per client id, bounded: the least recently seen client is forgotten."""

    def __init__(self, rate: float, burst: float, max_clients: int,
                 clock: Clock = time.monotonic) -> None:
        self.rate, self.burst, self.max_clients, self._clock = rate, burst, max_clients, clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, client: str) -> None:
        """Raise RATE_LIMITED with a Retry-After when ``client`` is over its rate."""
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, self._clock)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        wait = bucket.take()
        if wait > 0:
            raise AppError("RATE_LIMITED", retry_after_s=max(1, math.ceil(wait)))


class Admission:
    """At most ``capacity`` syntheses run and ``queue_size`` more wait; the rest get 429."""

    def __init__(self, capacity: int, queue_size: int, retry_after_s: int) -> None:
        self.capacity = capacity
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self.waiting = 0
        self.running = 0
        self._slots = asyncio.Semaphore(capacity)

    def reserve(self, bounded: bool = True) -> None:
        """Join the waiting line now (synchronously, so the 429 decision is immediate).

        ``bounded=False`` (async jobs, which have their own limit) may exceed queue_size.
        """
        if bounded and self.running + self.waiting >= self.capacity + self.queue_size:
            raise AppError("QUEUE_FULL", retry_after_s=self.retry_after_s)
        self.waiting += 1

    async def acquire(self) -> None:
        """Wait for a model instance after :meth:`reserve`."""
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self, keep_slot: bool = False) -> None:
        """``keep_slot``: the request is over but its model instance left service (a hung
        synthesis); :meth:`return_slot` gives the slot back once a replacement is loaded."""
        self.running -= 1
        if not keep_slot:
            self._slots.release()

    def return_slot(self) -> None:
        self._slots.release()


@dataclass(frozen=True)
class GateState:
    open: bool = True
    retry_after_s: int = 30
    reasons: tuple[str, ...] = ()


class GateWatcher:
    """Reads the sidecar's gate file only when its stat changes, at most every interval.

    A missing file means open (no sidecar, or it never closed); an unreadable or half-valid
    file keeps the last known state, because the sidecar writes atomically and a transient
    read problem is not a reason to flip the gate.
    """

    def __init__(self, path: str | os.PathLike[str], interval_s: float,
                 default_retry_after_s: int, clock: Clock = time.monotonic) -> None:
        self.path = os.fspath(path)
        self.interval_s = interval_s
        self.default_retry_after_s = default_retry_after_s
        self._clock = clock
        self._next_check = -math.inf
        self._signature: tuple[int, int, int] | None = None
        self.state = GateState(retry_after_s=default_retry_after_s)

    def current(self) -> GateState:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.interval_s
            self._refresh()
        return self.state

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            self._signature = None
            self.state = GateState(retry_after_s=self.default_retry_after_s)
            return
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._signature:
            return
        try:
            with open(self.path, "rb") as handle:
                data = json.loads(handle.read())
            is_open = data["open"]
            if not isinstance(is_open, bool):
                return
            retry = data.get("retry_after_s", self.default_retry_after_s)
            retry = int(retry) if isinstance(retry, (int, float)) and retry >= 1 \
                else self.default_retry_after_s
            reasons = tuple(str(r) for r in data.get("reasons") or ())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        self._signature = signature
        self.state = GateState(open=is_open, retry_after_s=retry, reasons=reasons)
