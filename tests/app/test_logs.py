"""The app's log lines follow the contract (README: "The log contract") in both formats."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import AppProcess, StartApp, read_log
from tests.integration.test_log_restart import Sidecar
from tests.support.local_stack import REPO, http_get, wait_until
from tts_app.logging import LogFile, StructuredLog

REQUIRED = {
    "service_start": {"pid", "version", "backend"},
    "http_request": {"method", "route", "status", "duration_ms"},
    "synthesis_start": {"text_len", "lang", "voice", "cache_hit"},
    "stage_time": {"stage", "duration_ms"},
    "audio_metrics": {"rms", "spectral_centroid"},
    "first_audio": {"duration_ms"},
    "synthesis_complete": {"status", "duration_ms", "error_code", "cache_hit", "cache_saved",
                           "audio_size_kb", "audio_duration_ms", "text_len", "model_stage"},
}


async def test_json_lines_carry_contract_fields(start_app: StartApp) -> None:
    app = await start_app()
    await app.client.post("/v1/tts", json={"text": "Log me. Twice over.", "stream": True})
    await app.client.post("/v1/tts", json={"text": "Log me. Twice over."})
    await app.client.get("/status")
    records = app.records()
    seen = {r["event"] for r in records}
    assert set(REQUIRED) <= seen
    for record in records:
        assert {"time", "level", "logger", "event", "request_id"} <= set(record)
        datetime.fromisoformat(record["time"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d",
                            record["time"])
        assert REQUIRED.get(record["event"], set()) <= set(record), record
    routes = [r["route"] for r in app.records("http_request")]
    assert routes == ["/v1/tts", "/v1/tts", "/status"]
    metrics = app.records("audio_metrics")[0]
    assert 0.02 < metrics["rms"] < 1
    assert 300 < metrics["spectral_centroid"] < 8000
    stages = {r["stage"] for r in app.records("stage_time")}
    assert {"text_normalize", "synthesis", "audio_render"} <= stages


async def test_text_format_is_indextts_style(start_app: StartApp) -> None:
    app = await start_app({"log": {"format": "text"}})
    await app.client.post("/v1/tts", json={"text": "Text, format = \"quoted\"."},
                          headers={"X-Request-ID": "t-1"})
    lines = app.log_path.read_text().splitlines()
    pattern = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - tts_app - (INFO|WARNING|ERROR)"
                         r" - (\w+): (.*)")
    assert all(pattern.fullmatch(line) for line in lines), lines
    complete = next(line for line in lines if " - synthesis_complete: " in line)
    assert "request_id=t-1, status=success" in complete
    assert "cache_hit=false" in complete


def test_traceback_becomes_continuation_lines_in_text(tmp_path: Path) -> None:
    log = StructuredLog(tmp_path / "a.log", "text", clock=lambda: 0.5)
    log.event("unhandled_exception", "r1", level="ERROR", message="a, b=c",
              traceback="Traceback (most recent call last):\n  boom\n")
    log.event("debug_only", level="DEBUG")
    log.close()
    lines = (tmp_path / "a.log").read_text().splitlines()
    assert lines[0].endswith('ERROR - unhandled_exception: request_id=r1, message="a, b=c"')
    assert lines[1:] == ["Traceback (most recent call last):", "  boom"]


def test_outside_rename_rotation_reopens_the_path(tmp_path: Path) -> None:
    now = [100.0]
    log = LogFile(tmp_path / "app.log", clock=lambda: now[0], check_interval_s=1.0)
    log.write([b"before\n"])
    (tmp_path / "app.log").rename(tmp_path / "app.log.1")
    log.write([b"same_second\n"])          # still the old file: checked once per interval
    now[0] += 1
    log.write([b"after\n"])
    log.close()
    assert (tmp_path / "app.log.1").read_text() == "before\nsame_second\n"
    assert (tmp_path / "app.log").read_text() == "after\n"


def test_size_rotation_renames_to_numbered_backups_and_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "tts-app.log"
    log = LogFile(path, max_bytes=20, backups=2)
    log.write([f"record {i:02d} 456789\n".encode() for i in range(4)])   # 17 bytes: one a file
    log.write([b"record 04 456789\n"])
    log.close()
    assert path.read_text() == "record 04 456789\n"
    assert (tmp_path / "tts-app.log.1").read_text() == "record 03 456789\n"
    assert (tmp_path / "tts-app.log.2").read_text() == "record 02 456789\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["tts-app.log", "tts-app.log.1", "tts-app.log.2"]


def test_a_record_larger_than_max_bytes_is_written_whole(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "tts-app.log", max_bytes=10, backups=3)
    log.write([b"a\n", b"0123456789abcdef\n", b"b\n"])
    log.close()
    assert [(tmp_path / name).read_text() for name in ("tts-app.log.2", "tts-app.log.1",
                                                         "tts-app.log")] == \
        ["a\n", "0123456789abcdef\n", "b\n"]


def test_rotation_keeps_the_inode_under_the_backup_name(tmp_path: Path) -> None:
    path = tmp_path / "tts-app.log"
    log = LogFile(path, max_bytes=10, backups=1)
    log.write([b"first 789\n"])
    inode = path.stat().st_ino
    log.write([b"second 89\n"])
    log.close()
    assert (tmp_path / "tts-app.log.1").stat().st_ino == inode
    assert path.read_text() == "second 89\n"


def test_a_failed_write_is_counted_and_never_raises(tmp_path: Path) -> None:
    log = StructuredLog(tmp_path / "app.log")
    full = os.open("/dev/full", os.O_WRONLY)
    saved = os.dup(log.file._fd)
    os.dup2(full, log.file._fd)                 # every write now fails with ENOSPC
    for i in range(3):
        log.event("http_request", f"r{i}", status=200)
    assert log.flush()
    assert (log.write_errors, log.failing) == (3, True)
    os.dup2(saved, log.file._fd)                # the disk has room again
    log.event("http_request", "r3", status=200)
    assert log.flush()
    assert (log.write_errors, log.failing) == (3, False)
    log.close()
    os.close(full)
    os.close(saved)
    assert [r["request_id"] for r in read_log(tmp_path / "app.log")] == ["r3"]


def test_writer_batches_records_in_order_and_close_writes_the_rest(tmp_path: Path) -> None:
    log = StructuredLog(tmp_path / "app.log", flush_interval_s=1.0)
    for i in range(2000):
        log.event("http_request", f"r{i}", status=429)
    log.close()
    assert [r["request_id"] for r in read_log(tmp_path / "app.log")] == \
        [f"r{i}" for i in range(2000)]
    log.event("after_close")
    assert log.write_errors == 1


@pytest.mark.slow
def test_an_exit_without_close_still_writes_what_was_logged(tmp_path: Path) -> None:
    code = ("import sys\nfrom tts_app.logging import StructuredLog\n"
            "log = StructuredLog(sys.argv[1], flush_interval_s=1.0)\n"
            "log.event('service_start')\nraise SystemExit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "app.log")],
                          cwd=REPO, timeout=60, check=False)
    assert done.returncode == 3
    assert [r["event"] for r in read_log(tmp_path / "app.log")] == ["service_start"]


def test_a_full_buffer_counts_records_as_lost_instead_of_growing(tmp_path: Path) -> None:
    log = StructuredLog(tmp_path / "app.log", flush_interval_s=1.0, buffer_max_bytes=65536)
    with log._cond:                     # the writer cannot take the buffer meanwhile
        for i in range(1000):
            log.event("http_request", f"r{i}", status=429)
    log.close()
    written = len(read_log(tmp_path / "app.log"))
    assert 0 < written < 1000
    assert written + log.write_errors == 1000


def test_records_reach_the_file_within_the_flush_interval(tmp_path: Path) -> None:
    log = StructuredLog(tmp_path / "app.log", flush_interval_s=0.05)
    log.event("http_request", "r1", status=200)
    deadline = time.monotonic() + 5
    while not (tmp_path / "app.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    log.close()


async def test_an_unwritable_log_never_decides_a_request_or_leaks_a_slot(
        start_app: StartApp) -> None:
    app = await start_app({"admission": {"queue_size": 1, "shed_delay_s": 0}})
    log = app.state.log
    full = os.open("/dev/full", os.O_WRONLY)
    saved = os.dup(log.file._fd)
    try:
        os.dup2(full, log.file._fd)                 # every write fails with ENOSPC
        texts = [f"Unlogged request {i}, long enough to queue behind the others." for i in
                 range(8)]
        responses = await asyncio.gather(*(app.client.post("/v1/tts", json={"text": text})
                                           for text in texts))
        statuses = [r.status for r in responses]
        assert set(statuses) <= {200, 429}
        assert 200 in statuses
        assert 429 in statuses
        for response in responses:
            if response.status == 429:
                assert (await response.json())["error"]["code"] == "QUEUE_FULL"
        assert log.flush()
        ready = await app.client.get("/readyz")
        assert (ready.status, (await ready.json())["reason"]) == (200, "log_write_failed")
        status = await (await app.client.get("/status")).json()
        assert (status["waiting"], status["running"]) == (0, 0)
        assert status["log_write_errors"] > len(texts)     # several records per request
    finally:
        os.dup2(saved, log.file._fd)                # the disk has room again
        os.close(saved)
        os.close(full)
    again = await app.client.post("/v1/tts", json={"text": texts[-1]})
    assert again.status == 200
    assert again.headers["X-Cache"] in ("hit", "miss")
    assert log.flush()
    assert (await (await app.client.get("/readyz")).json())["reason"] == "ready"
    assert [r["status"] for r in app.records("http_request")][-2:] == [200, 200]


def _tts_requests_counted(sidecar: Sidecar) -> tuple[float, float]:
    """(http_request records of /v1/tts, synthesis_complete records) the sidecar counted."""
    _, body = http_get(f"http://127.0.0.1:{sidecar.port}/metrics")
    requests = syntheses = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "tts_http_requests_total" and sample.labels["route"] == "/v1/tts":
                requests += sample.value
            elif sample.name == "tts_syntheses_total":
                syntheses += sample.value
    return requests, syntheses


@pytest.mark.slow
@pytest.mark.parametrize("restart_sidecar", [False, True], ids=["sidecar-up", "sidecar-restart"])
def test_rotation_under_load_loses_and_doubles_nothing(tmp_path: Path,
                                                       restart_sidecar: bool) -> None:
    """The real app rotates its log (64 KiB, 5 backups) several times under a request load
    while the real sidecar tails ``*.log*``; with ``sidecar-restart`` the sidecar is down
    across a rotation. Every request is counted exactly once."""
    app = AppProcess(tmp_path, {"log": {"max_bytes": 65536, "backups": 5}})
    sidecar = Sidecar(tmp_path, pattern="*.log*")
    texts = [f"Rotation text number {i % 12}, spoken again and again." for i in range(300)]
    logs = tmp_path / "logs"
    try:
        app.start()
        sidecar.start()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda text: app.post(text)[0], texts[:100]))
            if restart_sidecar:
                sidecar.kill()
                rotated = sorted(logs.glob("tts-app.log.*"))
                while sorted(logs.glob("tts-app.log.*")) == rotated:    # one rotation at least
                    statuses.append(app.post(texts[len(statuses)])[0])
                sidecar.start()
            statuses += pool.map(lambda text: app.post(text)[0], texts[len(statuses):])
        assert statuses == [200] * len(texts)
        # rotated more than once (the writer thread flushes the last records within ~100 ms)
        wait_until(lambda: (logs / "tts-app.log.2").exists(), 10,
                   what="a second rotation")
        wait_until(lambda: _tts_requests_counted(sidecar)[0] >= len(texts), 30,
                   what=f"{len(texts)} requests counted")
        time.sleep(1.0)     # anything read twice would be counted by now
        assert _tts_requests_counted(sidecar) == (len(texts), len(texts))
    finally:
        sidecar.process.stop()
        app.process.stop()
