"""The Redis store on its own, against a real redis-server: bounded calls, the circuit that
spares an outage its timeouts, one log line per outage, and values that are not ours."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.conftest import RedisServer, StartApp, read_log
from tests.conftest import FakeClock
from tests.support.local_stack import free_port
from tts_app.config import StoreConfig
from tts_app.errors import AppError
from tts_app.logging import StructuredLog
from tts_app.store import RedisStore, open_store
from tts_app.store.audio import SharedAudio, plausible_audio
from tts_app.store.jobs import SharedJobs

# A Redis call's bound where the test is not about timeouts: a loaded CI machine can take a
# while to answer, and a timeout there is a real fallback, not the behaviour under test.
SLACK = 2.0


@pytest.fixture
def log(tmp_path: Path) -> Iterator[StructuredLog]:
    structured = StructuredLog(str(tmp_path / "app.log"))
    yield structured
    structured.close()


def events(log: StructuredLog, tmp_path: Path, name: str) -> list[dict[str, object]]:
    assert log.flush()
    return [r for r in read_log(tmp_path / "app.log") if r["event"] == name]


async def test_local_is_the_default_and_shares_nothing(log: StructuredLog) -> None:
    store = open_store(StoreConfig(), log)
    assert not store.shared
    assert await store.put("audio:k", b"RIFF", 60) is False       # nothing kept to share
    assert await store.get("audio:k") is None
    # no other replica to wait for: every caller may synthesize at once
    assert await store.take_lease("lease:k", 60)
    assert await store.take_lease("lease:k", 60)
    assert store.status() == {"kind": "local", "healthy": True, "fallbacks_total": 0,
                              "bad_values_total": 0}


async def test_a_stopped_redis_costs_one_bounded_timeout_then_nothing_until_retry(
        redis_server: RedisServer, log: StructuredLog, tmp_path: Path) -> None:
    clock = FakeClock()
    store = RedisStore(StoreConfig(url=redis_server.url, timeout_s=0.2, retry_interval_s=5),
                       log, clock)
    assert await store.put("k", b"v", 60)
    with redis_server.frozen():
        started = time.monotonic()
        assert await store.get("k") is None
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        for _ in range(50):                                # inside retry_interval: not tried
            assert await store.get("k") is None
            assert await store.take_lease("lease", 5)      # down: go ahead and synthesize
        assert time.monotonic() - started < 0.5
        assert store.status() == {"kind": "redis", "healthy": False, "fallbacks_total": 101,
                                  "bad_values_total": 0}
    clock.now += 5
    assert await store.get("k") == b"v"
    assert store.healthy
    assert len(events(log, tmp_path, "store_unavailable")) == 1
    assert len(events(log, tmp_path, "store_recovered")) == 1
    await store.close()


async def test_a_lease_is_renewed_and_released_only_by_its_holder(
        redis_server: RedisServer, log: StructuredLog) -> None:
    config = StoreConfig(url=redis_server.url, timeout_s=SLACK)
    one, two = RedisStore(config, log), RedisStore(config, log)
    assert await one.take_lease("lease:x", 5)
    assert not await two.take_lease("lease:x", 5)
    await two.release_lease("lease:x")                     # not its lease: nothing happens
    assert await one.exists("lease:x")
    await one.release_lease("lease:x")
    assert not await one.exists("lease:x")
    assert await two.take_lease("lease:x", 5)
    await one.close()
    await two.close()


async def test_a_waiter_takes_over_when_the_lease_holder_dies(
        redis_server: RedisServer, log: StructuredLog) -> None:
    config = StoreConfig(url=redis_server.url, timeout_s=SLACK, lease_s=0.3,
                         poll_interval_s=0.02, wait_s=30)
    dead, alive = RedisStore(config, log), RedisStore(config, log)
    assert await dead.take_lease("lease:key", config.lease_s)    # then never renews it
    started = time.monotonic()
    assert await SharedAudio(alive, config).lookup("key", "wav") is None  # synthesize here
    assert time.monotonic() - started < 5.0
    await dead.close()
    await alive.close()


async def test_wrong_typed_or_implausible_values_are_counted_misses(
        redis_server: RedisServer, log: StructuredLog, tmp_path: Path) -> None:
    store = RedisStore(StoreConfig(url=redis_server.url, timeout_s=SLACK), log)
    redis_server.command("LPUSH", "tts:audio:k", "x")
    assert await store.get("audio:k") is None
    assert store.status()["bad_values_total"] == 1
    assert store.healthy
    redis_server.command("SET", "tts:audio:w", "RIFF0000WAVEnot-a-wav-at-all-but-long-enough!!")
    assert await SharedAudio(store, StoreConfig(wait_s=0)).lookup("w", "wav") is None
    assert store.status()["bad_values_total"] == 2
    jobs = SharedJobs(store, 60)
    redis_server.command("SET", "tts:job:" + "a" * 32, json.dumps({"id": "b" * 32}))
    assert await jobs.load("a" * 32) is None
    assert store.status()["bad_values_total"] == 3
    assert len(events(log, tmp_path, "store_bad_value")) == 3
    await store.close()


async def test_one_key_holds_one_body_across_stores(redis_server: RedisServer,
                                                    log: StructuredLog) -> None:
    config = StoreConfig(url=redis_server.url, timeout_s=SLACK)
    stores = [RedisStore(config, log), RedisStore(config, log)]
    a, b = SharedJobs(stores[0], 60), SharedJobs(stores[1], 60)
    await a.save("1" * 32, "wav", {"id": "1" * 32, "status": "queued"})
    assert await a.claim("client", "key", "1" * 32, "body one") is None
    assert await b.claim("client", "key", "2" * 32, "body one") == "1" * 32
    with pytest.raises(AppError) as conflict:
        await b.claim("client", "key", "3" * 32, "body two")
    assert conflict.value.code == "IDEMPOTENCY_CONFLICT"
    assert await b.claim("other client", "key", "4" * 32, "body two") is None
    for store in stores:
        await store.close()


def test_plausible_audio_accepts_what_the_app_writes_only() -> None:
    from tts_app import audio
    body = audio.encode(b"\x01\x00" * 100, 24000, "wav")
    assert plausible_audio(body, "wav") is None
    assert plausible_audio(body[:-2], "wav") is not None
    assert plausible_audio(b"\x01\x00", "pcm") is None
    assert plausible_audio(b"\x01", "pcm") is not None


async def test_an_app_whose_redis_is_unreachable_starts_and_answers_from_local_state(
        start_app: StartApp) -> None:
    running = await start_app({"store": {"url": f"redis://127.0.0.1:{free_port()}/0"}})
    client = running.client
    response = await client.post("/v1/tts", json={"text": "Nobody is listening."})
    assert response.status == 200
    assert (await response.read())[:4] == b"RIFF"
    submitted = await client.post("/v1/tts/jobs", json={"text": "A local job."},
                                  headers={"Idempotency-Key": "k"})
    assert submitted.status == 202
    job_id = (await submitted.json())["id"]
    replay = await client.post("/v1/tts/jobs", json={"text": "A local job."},
                               headers={"Idempotency-Key": "k"})
    assert (await replay.json())["id"] == job_id             # the key holds on this replica
    conflict = await client.post("/v1/tts/jobs", json={"text": "Another body."},
                                 headers={"Idempotency-Key": "k"})
    assert conflict.status == 409
    store = (await (await client.get("/status")).json())["store"]
    assert store["kind"] == "redis"
    assert store["healthy"] is False
    assert store["fallbacks_total"] >= 3
    assert len(running.records("store_unavailable")) == 1


async def test_a_redis_that_stops_answering_delays_a_request_by_a_bounded_time(
        start_app: StartApp, redis_server: RedisServer) -> None:
    running = await start_app({"store": {"url": redis_server.url, "timeout_s": 0.2}})
    client = running.client
    assert (await client.post("/v1/tts", json={"text": "Warm the pool."})).status == 200
    with redis_server.frozen():
        started = time.monotonic()
        response = await client.post("/v1/tts", json={"text": "Redis is frozen."})
        assert response.status == 200
        assert (await response.read())[:4] == b"RIFF"
        assert time.monotonic() - started < 3.0         # one 0.2 s timeout, then local
    store = (await (await client.get("/status")).json())["store"]
    assert store["healthy"] is False
    assert store["fallbacks_total"] >= 1


async def test_the_shared_audio_stays_within_its_byte_budget_oldest_out_first(
        redis_server: RedisServer, log: StructuredLog) -> None:
    store = RedisStore(StoreConfig(url=redis_server.url, timeout_s=SLACK), log)
    for i in range(10):
        await store.put_bounded(f"audio:{i}", bytes(1000), 60, "cache", 4500)
    kept = [i for i in range(10) if await store.get(f"audio:{i}") is not None]
    assert kept == [6, 7, 8, 9]
    assert await store.get("cache:total") == b"4000"
    await store.put_bounded("audio:9", bytes(2000), 60, "cache", 4500)   # rewritten, not twice
    assert await store.get("cache:total") == b"4000"
    assert [i for i in range(10) if await store.get(f"audio:{i}") is not None] == [7, 8, 9]
    await store.close()


async def test_entries_past_their_ttl_leave_the_budget(redis_server: RedisServer,
                                                       log: StructuredLog) -> None:
    store = RedisStore(StoreConfig(url=redis_server.url, timeout_s=SLACK), log)
    await store.put_bounded("audio:long", bytes(1000), 60, "cache", 4500)
    for i in range(3):
        await store.put_bounded(f"audio:{i}", bytes(1000), 0.05, "cache", 4500)
    time.sleep(0.1)
    await store.put_bounded("audio:new", bytes(1000), 60, "cache", 4500)
    assert await store.get("cache:total") == b"2000"          # long + new; the 3 expired
    assert await store.get("audio:long") is not None
    await store.close()


async def test_a_replica_that_gives_up_a_text_frees_its_lease_at_once(
        redis_server: RedisServer, log: StructuredLog) -> None:
    config = StoreConfig(url=redis_server.url, timeout_s=SLACK, lease_s=60)
    store = RedisStore(config, log)
    shared = SharedAudio(store, config)
    assert await shared.lookup("key", "wav") is None           # a miss: the lease is ours
    assert await store.exists("lease:key")
    shared.give_up("key")                                      # e.g. admission said QUEUE_FULL
    deadline = time.monotonic() + 5                            # far below lease_s
    while await store.exists("lease:key") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not await store.exists("lease:key")
    await store.close()
