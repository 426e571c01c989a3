"""Admission control: who may start a synthesis, and when to say "later" instead of failing.

Three independent checks, all answering with a Retry-After rather than an error or a hang:
- :class:`GateWatcher`: the sidecar's ingress gate file (VRAM pressure) -> 503 INGRESS_CLOSED.
- :class:`RateLimiter`: a token bucket per client, and one for all -> 429 RATE_LIMITED.
- :class:`Admission`: a semaphore sized to the backend's model instances (the "GPU
  semaphore") plus a bounded waiting line -> 429 QUEUE_FULL instead of pool exhaustion.
Clocks are injected so the bucket and the gate are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson

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

    def refund(self, cost: float = 1.0) -> None:
        """Give back what :meth:`take` took for a request that was refused elsewhere."""
        self._tokens = min(self.burst, self._tokens + cost)


class RateLimiter:
    """Token buckets per client identity, bounded (the least recently seen client is
    forgotten), plus one bucket for all clients together."""

    def __init__(self, rate: float, burst: float, max_clients: int, global_rate: float,
                 global_burst: float, clock: Clock = time.monotonic) -> None:
        self.rate, self.burst, self.max_clients, self._clock = rate, burst, max_clients, clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._global = TokenBucket(global_rate, global_burst, clock)

    def check(self, client: str) -> None:
        """Raise RATE_LIMITED with a Retry-After when ``client``, or everyone together, is
        over the rate."""
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
        wait = self._global.take()
        if wait > 0:
            # the client did nothing wrong: its own allowance is not spent on a refusal
            bucket.refund()
            raise AppError("RATE_LIMITED", "service-wide rate limit exceeded",
                           retry_after_s=max(1, math.ceil(wait)))


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

    def limits(self) -> dict[str, int]:
        """The limits in force, for /status: 429 QUEUE_FULL starts when running + waiting
        reaches ``queue_limit``."""
        return {"queue_size": self.queue_size, "queue_limit": self.capacity + self.queue_size}


@dataclass(frozen=True)
class GateState:
    open: bool = True
    retry_after_s: int = 30
    reasons: tuple[str, ...] = ()


# The sidecar writes a few hundred bytes; a bigger file is not its gate file.
GATE_FILE_MAX_BYTES = 65536
# Bounds on what the file says. Beyond them a value is cut down rather than refused: the
# open/closed decision must not be lost over a long hint or a long list of alert names.
MAX_GATE_RETRY_AFTER_S = 3600
MAX_GATE_REASONS = 32
MAX_GATE_REASON_CHARS = 200


def parse_gate(raw: bytes, default_retry_after_s: int) -> GateState:
    """The sidecar's ``{"open", "reasons", "since", "retry_after_s"}``, checked field by
    field; ValueError names what is wrong. orjson refuses NaN, infinities and nesting
    deeper than 1024, so no file can make parsing itself fail in another way."""
    if len(raw) > GATE_FILE_MAX_BYTES:
        raise ValueError(f"larger than {GATE_FILE_MAX_BYTES} bytes")
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    is_open = data.get("open")
    if not isinstance(is_open, bool):
        raise ValueError("open: expected true or false")
    retry = data.get("retry_after_s", default_retry_after_s)
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 1:
        raise ValueError("retry_after_s: expected a positive integer")
    reasons = data.get("reasons") or []
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise ValueError("reasons: expected a list of strings")
    return GateState(open=is_open, retry_after_s=min(retry, MAX_GATE_RETRY_AFTER_S),
                     reasons=tuple(r[:MAX_GATE_REASON_CHARS]
                                   for r in reasons[:MAX_GATE_REASONS]))


class GateWatcher:
    """Reads the sidecar's gate file only when its stat changes, at most every interval.

    A missing file means open (no sidecar, or it never closed). A file that cannot be read,
    parsed or validated keeps the last good state - the sidecar writes atomically, so a
    transient problem is not a reason to flip the gate - and is reported to ``on_invalid``
    once until a good file (or none) is seen again.
    """

    def __init__(self, path: str | os.PathLike[str], interval_s: float,
                 default_retry_after_s: int, clock: Clock = time.monotonic,
                 on_invalid: Callable[[str], None] = lambda _problem: None) -> None:
        self.path = os.fspath(path)
        self.interval_s = interval_s
        self.default_retry_after_s = default_retry_after_s
        self._clock = clock
        self._on_invalid = on_invalid
        self._next_check = -math.inf
        self._signature: tuple[int, int, int] | None = None
        self._reported = False
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
        except FileNotFoundError:
            self._signature, self._reported = None, False
            self.state = GateState(retry_after_s=self.default_retry_after_s)
            return
        except OSError as exc:
            self._invalid(f"cannot stat: {exc.strerror}")
            return
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._signature:
            return
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(GATE_FILE_MAX_BYTES + 1)
        except OSError as exc:
            self._invalid(f"cannot read: {exc.strerror}")    # retried at the next check
            return
        # A bad content is not re-parsed until the file changes.
        self._signature = signature
        try:
            self.state = parse_gate(raw, self.default_retry_after_s)
        except ValueError as exc:       # orjson.JSONDecodeError is a ValueError
            self._invalid(str(exc))
            return
        self._reported = False

    def _invalid(self, problem: str) -> None:
        if not self._reported:
            self._reported = True
            self._on_invalid(problem)
