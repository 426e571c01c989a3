"""The app's log lines follow the contract (README: "The log contract") in both formats."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from tests.app.conftest import StartApp
from tts_app.logging import StructuredLog

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
    assert 0.02 < metrics["rms"] < 1 and 300 < metrics["spectral_centroid"] < 8000
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
    assert "request_id=t-1, status=success" in complete and "cache_hit=false" in complete


def test_traceback_becomes_continuation_lines_in_text(tmp_path: Path) -> None:
    log = StructuredLog(tmp_path / "a.log", "text", clock=lambda: 0.5)
    log.event("unhandled_exception", "r1", level="ERROR", message="a, b=c",
              traceback="Traceback (most recent call last):\n  boom\n")
    log.event("debug_only", level="DEBUG")
    lines = (tmp_path / "a.log").read_text().splitlines()
    assert lines[0].endswith('ERROR - unhandled_exception: request_id=r1, message="a, b=c"')
    assert lines[1:] == ["Traceback (most recent call last):", "  boom"]
    log.close()


def test_rename_rotation_reopens_the_path(tmp_path: Path) -> None:
    now = [100.0]
    log = StructuredLog(tmp_path / "app.log", clock=lambda: now[0])
    log.event("before")
    (tmp_path / "app.log").rename(tmp_path / "app.log.1")
    log.event("same_second")          # still the old file: checked once per second
    now[0] += 1
    log.event("after")
    old = (tmp_path / "app.log.1").read_text()
    new = (tmp_path / "app.log").read_text()
    assert '"before"' in old and '"same_second"' in old and '"after"' in new
    log.close()
