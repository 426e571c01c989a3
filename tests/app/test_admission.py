"""Token bucket, per-client limiter, admission line and gate watcher, with injected clocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import FakeClock
from tts_app.admission import Admission, GateWatcher, RateLimiter, TokenBucket
from tts_app.errors import AppError


def test_token_bucket_refills_at_rate_up_to_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take() == 0.0
    clock.now += 100
    assert [bucket.take() for _ in range(4)][-1] > 0      # refill capped at burst


def test_rate_limiter_separates_clients_and_sets_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.5, burst=1, max_clients=2, global_rate=100, global_burst=100,
                          clock=clock)
    limiter.check("a")
    with pytest.raises(AppError) as caught:
        limiter.check("a")
    assert caught.value.code == "RATE_LIMITED"
    assert caught.value.retry_after_s == 2
    limiter.check("b")
    clock.now += 2
    limiter.check("a")


def test_rate_limiter_forgets_least_recent_client_when_full() -> None:
    limiter = RateLimiter(rate=0.001, burst=1, max_clients=2, global_rate=100, global_burst=100,
                          clock=FakeClock())
    limiter.check("a")
    limiter.check("b")
    limiter.check("c")              # evicts a
    limiter.check("a")              # fresh bucket again
    with pytest.raises(AppError):
        limiter.check("c")


def test_global_bucket_refuses_everyone_and_refunds_the_client() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.001, burst=2, max_clients=10, global_rate=1, global_burst=2,
                          clock=clock)
    limiter.check("a")
    limiter.check("b")
    with pytest.raises(AppError) as caught:
        limiter.check("c")
    assert caught.value.code == "RATE_LIMITED"
    assert "service-wide" in caught.value.message
    assert caught.value.retry_after_s == 1
    clock.now += 2
    limiter.check("c")
    limiter.check("c")      # c's refused request did not spend its own allowance


async def test_admission_counts_running_and_waiting() -> None:
    admission = Admission(capacity=2, queue_size=1, retry_after_s=3)
    for _ in range(3):
        admission.reserve()
    with pytest.raises(AppError) as caught:
        admission.reserve()
    assert caught.value.code == "QUEUE_FULL"
    assert caught.value.retry_after_s == 3
    admission.reserve(bounded=False)              # jobs bypass the line limit
    await admission.acquire()
    await admission.acquire()
    assert (admission.running, admission.waiting) == (2, 2)
    admission.release()
    await admission.acquire()
    assert (admission.running, admission.waiting) == (2, 1)


def test_admission_reports_the_limit_where_429_starts() -> None:
    admission = Admission(capacity=2, queue_size=3, retry_after_s=1)
    assert admission.limits() == {"queue_size": 3, "queue_limit": 5}
    for _ in range(admission.limits()["queue_limit"]):
        admission.reserve()
    with pytest.raises(AppError):
        admission.reserve()


def write(path: Path, payload: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    os.replace(tmp, path)


def test_gate_watcher_follows_the_file(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "ingress.json"
    gate = GateWatcher(path, interval_s=1.0, default_retry_after_s=30, clock=clock)
    assert gate.current().open is True                     # missing file = open
    write(path, {"open": False, "reasons": ["vram_high"], "since": 1.0, "retry_after_s": 12})
    assert gate.current().open is True                     # not re-checked within interval
    clock.now += 1
    state = gate.current()
    assert (state.open, state.retry_after_s, state.reasons) == (False, 12, ("vram_high",))
    write(path, "{half written")                           # garbage keeps the last state
    clock.now += 1
    assert gate.current().open is False
    write(path, {"open": True, "reasons": [], "since": 2.0, "retry_after_s": 12})
    clock.now += 1
    assert gate.current().open is True
    path.unlink()
    clock.now += 1
    assert gate.current().open is True
