"""A cache that cannot be written never fails a request: 200 + CACHE_WRITE_FAILED warning."""

from __future__ import annotations

from pathlib import Path

from tests.app.conftest import StartApp


async def test_unwritable_cache_dir_still_serves(start_app: StartApp, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file: nothing can be created beneath it (even as root)")
    app = await start_app({"cache": {"dir": str(blocker / "cache")}})
    for _ in range(2):
        response = await app.client.post("/v1/tts", json={"text": "Disk is full."})
        assert response.status == 200 and (await response.read())[:4] == b"RIFF"
    warnings = [r for r in app.records() if r.get("warning_code") == "CACHE_WRITE_FAILED"]
    assert len(warnings) >= 2 and all(w["level"] == "WARNING" for w in warnings)
    completes = app.records("synthesis_complete")
    assert completes[0]["status"] == "success" and completes[0]["cache_saved"] is False
