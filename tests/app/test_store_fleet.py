"""Three real app processes sharing one real redis-server: jobs, Idempotency-Keys and the
audio cache behave as one service whichever replica a request reaches, and a Redis outage
costs sharing, never a request."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.conftest import AppProcess, RedisServer, read_log
from tests.support.local_stack import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[AppProcess]]:
    apps = []
    for name in "abc":
        (tmp_path / name).mkdir()
        apps.append(AppProcess(tmp_path / name, {
            # timeout_s with a margin for a loaded CI machine: a spurious timeout is a real
            # fallback (a second synthesis), not what these tests are about
            "store": {"url": redis_server.url, "timeout_s": 1.0, "retry_interval_s": 0.5,
                      "lease_s": 2},
            "log": {"flush_interval_s": 0.01}}))
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(AppProcess.start, apps))
        yield apps
    finally:
        for app in apps:
            app.process.stop()


def synthesis_lines(apps: list[AppProcess]) -> list[dict[str, Any]]:
    """synthesis_complete lines of a real synthesis (not a hit), across the fleet's logs."""
    time.sleep(0.3)      # the buffered log writers flush every 10 ms
    return [r for app in apps for r in read_log(app.log_path)
            if r["event"] == "synthesis_complete" and r["cache_hit"] is False]


def wait_job(app: AppProcess, job_id: str) -> tuple[int, dict[str, str], bytes]:
    deadline = time.monotonic() + 30
    while True:
        answer = app.call(f"/v1/tts/jobs/{job_id}")
        if answer[1].get("X-Job-Status") not in ("queued", "running") \
                or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def test_a_job_submitted_on_one_replica_is_fetched_from_the_others(
        fleet: list[AppProcess]) -> None:
    a, b, c = fleet
    status, headers, body = a.call("/v1/tts/jobs", {"text": "A job shared by the fleet."},
                                   {"Idempotency-Key": "job-1"})
    assert status == 202, body
    job_id = json.loads(body)["id"]
    assert json.loads(b.call(f"/v1/tts/jobs/{job_id}",
                             headers={"Accept": "application/json"})[2])["id"] == job_id
    done_b, done_c = wait_job(b, job_id), wait_job(c, job_id)
    assert done_b[0] == done_c[0] == 200
    assert done_b[1]["Content-Type"] == "audio/wav"
    assert done_b[2][:4] == b"RIFF"
    assert done_b[2] == done_c[2] == wait_job(a, job_id)[2]
    # a retry of the same request reaching another replica is the same job, not a second one
    status, headers, body = c.call("/v1/tts/jobs", {"text": "A job shared by the fleet."},
                                   {"Idempotency-Key": "job-1"})
    assert status == 202
    assert json.loads(body)["id"] == job_id
    assert headers.get("Idempotent-Replayed") == "true"
    assert b.call("/v1/tts/jobs/" + "0" * 32)[0] == 404


def test_one_key_with_two_bodies_on_two_replicas_is_one_202_and_one_409(
        fleet: list[AppProcess]) -> None:
    a, b, _c = fleet
    def submit(app: AppProcess, text: str, key: str, barrier: threading.Barrier) -> int:
        barrier.wait()                        # both requests reach their replica together
        return app.call("/v1/tts/jobs", {"text": text}, {"Idempotency-Key": key})[0]

    for round_ in range(5):
        barrier = threading.Barrier(2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            statuses = sorted(pool.map(submit, (a, b), ("First body.", "Second body."),
                                       [f"race-{round_}"] * 2, [barrier] * 2))
        assert statuses == [202, 409], f"round {round_}: {statuses}"


def test_20_identical_concurrent_requests_across_replicas_make_one_synthesis(
        fleet: list[AppProcess]) -> None:
    text = " ".join(["This long sentence is asked for by twenty clients at once."] * 8)
    barrier = threading.Barrier(20)

    def ask(index: int) -> tuple[int, bytes]:
        barrier.wait()
        status, _headers, body = fleet[index % 3].call("/v1/tts", {"text": text})
        return status, body

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert {status for status, _ in answers} == {200}
    assert len({body for _, body in answers}) == 1
    assert len(synthesis_lines(fleet)) == 1


def test_redis_killed_mid_load_gives_no_500_and_sharing_recovers_when_it_returns(
        fleet: list[AppProcess], redis_server: RedisServer) -> None:
    a, b, _c = fleet
    statuses: list[int] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            app = fleet[(worker + i) % 3]
            statuses.append(app.call("/v1/tts", {"text": f"Load {worker} {i}, mostly new."})[0])
            i += 1

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(load, w) for w in range(6)]
        time.sleep(1.5)
        redis_server.stop()
        time.sleep(2.0)
        during = [app.get_json("/status")["store"] for app in fleet]
        # while Redis is down a job is still taken and served by the replica that took it
        status, _h, body = a.call("/v1/tts/jobs", {"text": "Taken during the outage."},
                                  {"Idempotency-Key": "outage"})
        assert status == 202, body
        assert wait_job(a, json.loads(body)["id"])[0] == 200
        redis_server.start()
        time.sleep(1.5)
        stop.set()
        for worker in workers:
            worker.result()
    assert len(statuses) > 30, sorted(set(statuses))
    assert set(statuses) == {200}, sorted(set(statuses))
    assert all(s["kind"] == "redis" and s["healthy"] is False for s in during), during
    assert all(s["fallbacks_total"] > 0 for s in during), during
    wait_until(lambda: all(app.get_json("/status")["store"]["healthy"] for app in fleet),
               10, what="every replica back on Redis")
    for app, store in zip(fleet, during, strict=True):
        lines = [r for r in read_log(app.log_path)
                 if r["event"] in ("store_unavailable", "store_recovered")]
        # one line when an outage starts, one when it ends, never one per request (a slow
        # moment of Redis before the kill is an outage of its own)
        assert [r["event"] for r in lines] == ["store_unavailable", "store_recovered"] * (
            len(lines) // 2), lines
        assert 0 < len(lines) // 2 < store["fallbacks_total"]
        assert {r["warning_code"] for r in lines[::2]} == {"STORE_UNAVAILABLE"}
    # shared again: a job taken on A is visible on B
    status, _h, body = a.call("/v1/tts/jobs", {"text": "After the outage."})
    assert wait_job(b, json.loads(body)["id"])[0] == 200


def test_a_garbage_or_wrong_type_redis_value_is_a_counted_miss_never_a_500(
        fleet: list[AppProcess], redis_server: RedisServer) -> None:
    a, b, c = fleet
    assert a.call("/v1/tts", {"text": "Someone will scribble over me."})[0] == 200
    wait_until(lambda: redis_server.command(   # shared just after the answer
        "EVAL", "return #redis.call('keys', 'tts:audio:*')", "0") == b":1", 10,
        what="the audio shared")
    assert redis_server.command("EVAL", "for _, k in ipairs(redis.call('keys', 'tts:audio:*'))"
                                " do redis.call('set', k, 'garbage') end return 0", "0") == b":0"
    status, _h, body = b.call("/v1/tts", {"text": "Someone will scribble over me."})
    assert status == 200
    assert body[:4] == b"RIFF"
    assert b.get_json("/status")["store"]["bad_values_total"] >= 1   # each read of it counts
    assert redis_server.command("EVAL", "for _, k in ipairs(redis.call('keys', 'tts:audio:*'))"
                                " do redis.call('del', k) redis.call('lpush', k, 'x') end "
                                "return 0", "0") == b":0"
    status, _h, body = c.call("/v1/tts", {"text": "Someone will scribble over me."})
    assert status == 200
    assert body[:4] == b"RIFF"
    assert c.get_json("/status")["store"]["bad_values_total"] >= 1
    # a job record that is not JSON, or of the wrong type: not found, never a 500
    status, _h, body = a.call("/v1/tts/jobs", {"text": "A job to be scribbled over."},
                              {"Idempotency-Key": "scribbled"})
    job_id = json.loads(body)["id"]
    wait_job(a, job_id)
    redis_server.command("SET", f"tts:job:{job_id}", "{not json")
    assert b.call(f"/v1/tts/jobs/{job_id}")[0] == 404
    redis_server.command("DEL", f"tts:job:{job_id}")
    redis_server.command("SADD", f"tts:job:{job_id}", "x")
    assert c.call(f"/v1/tts/jobs/{job_id}")[0] == 404
    assert a.call(f"/v1/tts/jobs/{job_id}")[0] == 200        # its own replica still has it
    # an idempotency record that is not ours: the key is taken afresh
    assert redis_server.command("EVAL", "for _, k in ipairs(redis.call('keys', 'tts:idem:*'))"
                                " do redis.call('set', k, '[1]') end return 0", "0") == b":0"
    status, _h, body = b.call("/v1/tts/jobs", {"text": "Another body."},
                              {"Idempotency-Key": "scribbled"})
    assert status == 202, body
