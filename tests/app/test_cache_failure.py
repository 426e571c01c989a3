"""A cache that cannot store audio never fails a request, and the log says why it did not:
200 + CACHE_WRITE_FAILED warning, cache_saved=false with cache_skip=write_failed|too_large."""

from __future__ import annotations

from pathlib import Path

from tests.app.conftest import StartApp


async def test_unwritable_cache_dir_still_serves(start_app: StartApp, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file: nothing can be created beneath it (even as root)")
    app = await start_app({"cache": {"dir": str(blocker / "cache")}})
    for _ in range(2):
        response = await app.client.post("/v1/tts", json={"text": "Disk is full."})
        assert response.status == 200
        assert (await response.read())[:4] == b"RIFF"
    warnings = [r for r in app.records() if r.get("warning_code") == "CACHE_WRITE_FAILED"]
    assert len(warnings) >= 2
    assert all(w["level"] == "WARNING" for w in warnings)
    completes = app.records("synthesis_complete")
    assert completes[0]["status"] == "success"
    assert completes[0]["cache_saved"] is False


async def test_audio_larger_than_the_cache_is_logged_as_not_saved(start_app: StartApp,
                                                                 tmp_path: Path) -> None:
    app = await start_app({"cache": {"max_bytes": 1000}})
    response = await app.client.post("/v1/tts", json={"text": "Far more than a kilobyte."})
    assert response.status == 200
    assert len(await response.read()) > 1000
    complete = app.records("synthesis_complete")[0]
    assert (complete["cache_saved"], complete["cache_skip"]) == (False, "too_large")
    assert list((tmp_path / "cache").rglob("*.audio")) == []


async def test_saved_audio_says_so_without_a_skip_reason(start_app: StartApp) -> None:
    app = await start_app()
    await app.client.post("/v1/tts", json={"text": "Small enough."})
    complete = app.records("synthesis_complete")[0]
    assert complete["cache_saved"] is True
    assert "cache_skip" not in complete


async def test_write_failure_names_its_reason(start_app: StartApp, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    app = await start_app({"cache": {"dir": str(blocker / "cache")}})
    await app.client.post("/v1/tts", json={"text": "Nowhere to write."})
    complete = app.records("synthesis_complete")[0]
    assert (complete["cache_saved"], complete["cache_skip"]) == (False, "write_failed")
