"""The audio cache shared between replicas, with one synthesis per text across the fleet.

A replica that misses its own cache and flights asks the store. On a miss it takes a lease on
the cache key (``SET NX`` with a short TTL) and synthesizes; the replicas that find the lease
taken wait, polling for the audio, for at most ``wait_s``. The holder renews its lease while
it synthesizes and publishes the audio (then releases the lease) when done, so a holder that
dies or fails lets the lease lapse or go and a waiter takes over at once. Concurrent lookups
of one key on one replica share one lookup, so a replica polls Redis once per key, not once
per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tts_app.config import StoreConfig
from tts_app.store.base import Store


def plausible_audio(body: bytes, fmt: str) -> str | None:
    """Why ``body`` cannot be a response in ``fmt`` that this app wrote, or None."""
    if fmt == "wav":
        if len(body) < 44 or body[:4] != b"RIFF" or body[8:12] != b"WAVE":
            return "not a WAV body"
        if int.from_bytes(body[40:44], "little") != len(body) - 44:
            return "WAV data size does not match the body"
        return None
    return None if body and len(body) % 2 == 0 else "not 16-bit PCM"


class SharedAudio:
    def __init__(self, store: Store, config: StoreConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._lookups: dict[str, asyncio.Task[bytes | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def lookup(self, key: str, fmt: str) -> bytes | None:
        """Audio another replica made, or None: then the caller synthesizes it."""
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(key, fmt))
            self._lookups[key] = task
            task.add_done_callback(lambda _t: self._lookups.pop(key, None))
        return await asyncio.shield(task)

    async def _get(self, key: str, fmt: str) -> bytes | None:
        body = await self._store.get("audio:" + key)
        if body is None:
            return None
        problem = plausible_audio(body, fmt)
        if problem is not None:
            self._store.count_bad_value("audio:" + key, problem)
            return None
        return body

    async def _lookup(self, key: str, fmt: str) -> bytes | None:
        body = await self._get(key, fmt)
        if body is not None:
            return body
        deadline = self._clock() + self._config.wait_s
        while not await self._store.take_lease("lease:" + key, self._config.lease_s):
            # another replica is synthesizing it: wait for its audio, or for its lease to go
            while True:
                if self._clock() >= deadline:
                    return None
                await asyncio.sleep(self._config.poll_interval_s)
                body = await self._get(key, fmt)
                if body is not None:
                    return body
                if not await self._store.exists("lease:" + key):
                    break
        return None

    def publish_when_done(self, key: str, pcm: Awaitable[bytes],
                          encode: Callable[[bytes], bytes]) -> None:
        """Hold the lease while ``pcm`` (the local synthesis) runs; then share its audio."""
        self._spawn(self._hold(key, pcm, encode))

    def give_up(self, key: str) -> None:
        """This replica will not synthesize ``key`` after all: its lease (if it holds one) goes
        now, so a replica waiting for the audio takes over without waiting for the lease."""
        self._spawn(self._store.release_lease("lease:" + key))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hold(self, key: str, pcm: Awaitable[bytes],
                    encode: Callable[[bytes], bytes]) -> None:
        lease = "lease:" + key
        result = asyncio.ensure_future(pcm)
        try:
            while not (await asyncio.wait({result}, timeout=self._config.lease_s / 3))[0]:
                await self._store.renew_lease(lease, self._config.lease_s)
            if result.exception() is None:
                body = encode(result.result())
                if len(body) <= self._config.cache_max_entry_bytes:
                    await self._store.put_bounded("audio:" + key, body,
                                                  self._config.cache_ttl_s, "cache",
                                                  self._config.cache_max_bytes)
        finally:
            if not result.done():
                result.cancel()
            await self._store.release_lease(lease)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
