"""Live request timelines: the bounded store and its ``/requests`` routes over real HTTP."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from exporter.config import Config
from exporter.logs.parsers import MalformedLine, RecordParser
from exporter.logs.timelines import TimelineComponent, TimelineStore
from exporter.metrics import SidecarMetrics
from exporter.server import build_app

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "analyze"
PARSER = RecordParser()


def _add(store: TimelineStore, rid: str | None, event: str, t: float,
         **fields: object) -> None:
    """One JSON record line, parsed as the pipeline parses it and handed to the hook."""
    line = json.dumps({"time": t, "level": "INFO", "event": event,
                       **({"request_id": rid} if rid else {}), **fields})
    parsed = PARSER.fields(line)
    assert parsed is not None
    if rid:   # the pipeline hands over only lines with a request id
        store.add("f", [(rid, event, line, parsed[2].get("status"))])


def _golden_store() -> TimelineStore:
    """A store fed the golden rotated logs (both formats) line by line, as the pipeline does."""
    store = TimelineStore()
    for name in ("app.log.2.gz", "app.log.1", "app.log"):
        path = GOLDEN / name
        data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        batch = []
        for line in data.decode().splitlines():
            try:
                parsed = PARSER.fields(line)
            except MalformedLine:   # counted and skipped by the pipeline
                continue
            if parsed is not None and parsed[2].get("id"):
                fields = parsed[2]
                batch.append((fields["id"], parsed[1], line, fields.get("status")))
        store.add(name, batch)
    return store


def test_store_from_real_parser_records() -> None:
    store = _golden_store()
    r2 = store.get("r2")
    assert r2 is not None and r2["status"] == "failed"
    assert [s["stage"] for s in r2["stages"]] == ["text_normalize", "llm_inference"]
    assert r2["duration_ms"] == 1120 and r2["span_ms"] == 1130.0
    assert r2["errors"][0]["error_code"] == "SCIPY_FFT_INVALID"
    r1 = store.get("r1")
    assert r1 is not None and r1["status"] == "success"
    assert store.get("missing") is None


def test_recent_newest_first_filtered_and_limited() -> None:
    store = _golden_store()
    failed = store.recent(status="failed")
    assert [r["request_id"] for r in failed] == ["r6", "r4", "r2"]
    assert [r["request_id"] for r in store.recent(limit=2)] == ["r6", "r5"]
    assert all(r["status"] == "success" for r in store.recent(status="success"))


def test_only_the_newest_lines_are_kept_and_recent_orders_by_last_record() -> None:
    store = TimelineStore(max_lines=3, max_records_per_request=10)
    _add(store, "a", "synthesis_start", 1.0)
    _add(store, "b", "synthesis_start", 2.0)
    _add(store, "a", "stage_time", 3.0, stage="x", duration_ms=1)
    _add(store, "c", "synthesis_start", 4.0)
    _add(store, None, "service_start", 5.0)     # no request id: never handed over
    assert len(store) == 3
    a = store.get("a")
    assert a is not None and [r["event"] for r in a["records"]] == ["stage_time"]
    assert [(r["request_id"], r["updated"], r["records"]) for r in store.recent()] == [
        ("c", 4.0, 1), ("a", 3.0, 1), ("b", 2.0, 1)]
    _add(store, "d", "synthesis_start", 6.0)
    assert store.get("b") is None


def test_records_per_request_bounded_with_drop_count() -> None:
    store = TimelineStore(max_lines=50, max_records_per_request=3)
    for i in range(10):
        _add(store, "a", "stage_time", float(i), stage=f"s{i}", duration_ms=i)
    timeline = store.get("a")
    assert timeline is not None and timeline["dropped_records"] == 7
    assert [s["stage"] for s in timeline["stages"]] == ["s7", "s8", "s9"]


def test_http_status_sets_status_without_synthesis() -> None:
    store = TimelineStore()
    _add(store, "v", "http_request", 1.0, status=422, route="/v1/tts")
    _add(store, "ok", "http_request", 2.0, status=200, route="/health")
    text = ("2024-06-12 14:22:38,415 - app - INFO - http_request: request_id=t, "
            "method=POST, route=/v1/tts, status=503, duration_ms=2")
    parsed = PARSER.fields(text)
    assert parsed is not None
    store.add("f", [("t", parsed[1], text, parsed[2]["status"])])
    assert [r["request_id"] for r in store.recent(status="failed")] == ["t", "v"]
    assert store.recent(status="success")[0]["request_id"] == "ok"
    timeline = store.get("t")
    assert timeline is not None and timeline["records"][0]["fields"]["status"] == 503


async def _client(component: TimelineComponent) -> TestClient:
    client = TestClient(TestServer(build_app(SidecarMetrics(), component.routes)))
    await client.start_server()
    return client


async def test_routes_over_http() -> None:
    component = TimelineComponent(_golden_store())
    await component.start()
    client = await _client(component)
    try:
        resp = await client.get("/requests/r2")
        assert resp.status == 200
        body = await resp.json()
        assert body["request_id"] == "r2" and body["status"] == "failed"
        assert len(body["records"]) == 5     # the free-form error line has no id field
        resp = await client.get("/requests/unknown-id")
        assert resp.status == 404
        assert (await resp.json())["request_id"] == "unknown-id"
        resp = await client.get("/requests", params={"status": "failed", "limit": "2"})
        assert [r["request_id"] for r in (await resp.json())["requests"]] == ["r6", "r4"]
        resp = await client.get("/requests", params={"limit": "x"})
        assert resp.status == 400
        resp = await client.get("/requests", params={"limit": "0"})
        assert resp.status == 400
    finally:
        await client.close()
        await component.stop()


def test_from_config_uses_timelines_section() -> None:
    config = Config()
    component = TimelineComponent.from_config(config)
    assert component.store.max_lines == config.timelines.max_lines
    assert component.store.max_records == config.timelines.max_records_per_request


def test_listing_and_timeline_agree_on_the_newest_status() -> None:
    store = TimelineStore()
    _add(store, "x", "http_request", 1.0, status=503, route="/v1/tts")
    _add(store, "x", "http_request", 2.0, status=200, route="/v1/tts")
    _add(store, "y", "synthesis_complete", 3.0, status="failed")
    _add(store, "y", "synthesis_complete", 4.0, status="success")
    listed = {r["request_id"]: r["status"] for r in store.recent()}
    assert listed == {"x": "success", "y": "success"}
    for rid in ("x", "y"):
        timeline = store.get(rid)
        assert timeline is not None and timeline["status"] == listed[rid]
