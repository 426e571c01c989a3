"""Live request timelines: the bounded store and its ``/requests`` routes over real HTTP."""

from __future__ import annotations

import gzip
import json
import statistics
import time
import tracemalloc
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from exporter.config import AuthConfig, Config, GateConfig, TimelinesConfig
from exporter.gate import Gate, GateComponent
from exporter.logs.parsers import MalformedLine, RecordParser
from exporter.logs.pipeline import KeptLine
from exporter.logs.timelines import TimelineComponent, TimelineStore, shorten_line
from exporter.metrics import SidecarMetrics
from exporter.server import build_app
from tests.unit.conftest import gate_latencies_while_hammered

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
    assert r2 is not None
    assert r2["status"] == "failed"
    assert [s["stage"] for s in r2["stages"]] == ["text_normalize", "llm_inference"]
    assert r2["duration_ms"] == 1120
    assert r2["span_ms"] == 1130.0
    assert r2["errors"][0]["error_code"] == "SCIPY_FFT_INVALID"
    r1 = store.get("r1")
    assert r1 is not None
    assert r1["status"] == "success"
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
    assert a is not None
    assert [r["event"] for r in a["records"]] == ["stage_time"]
    assert [(r["request_id"], r["updated"], r["records"]) for r in store.recent()] == [
        ("c", 4.0, 1), ("a", 3.0, 1), ("b", 2.0, 1)]
    _add(store, "d", "synthesis_start", 6.0)
    assert store.get("b") is None


def test_records_per_request_bounded_with_drop_count() -> None:
    store = TimelineStore(max_lines=50, max_records_per_request=3)
    for i in range(10):
        _add(store, "a", "stage_time", float(i), stage=f"s{i}", duration_ms=i)
    timeline = store.get("a")
    assert timeline is not None
    assert timeline["dropped_records"] == 7
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
    assert timeline is not None
    assert timeline["records"][0]["fields"]["status"] == 503


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
        assert body["request_id"] == "r2"
        assert body["status"] == "failed"
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


def test_the_timelines_section_bounds_what_the_component_keeps_and_shows() -> None:
    config = Config(timelines=TimelinesConfig(max_lines=4, max_records_per_request=2,
                                              fields=["stage"]))
    store = TimelineComponent.from_config(config).store
    for i in range(3):
        _add(store, "a", "stage_time", float(i), stage=f"s{i}", duration_ms=i)
    _add(store, "b", "stage_time", 3.0, stage="t0", duration_ms=1)
    timeline = store.get("a")
    assert timeline is not None
    assert timeline["dropped_records"] == 1         # three kept lines, the newest two shown
    assert [r["fields"] for r in timeline["records"]] == [{"stage": "s1"}, {"stage": "s2"}]
    _add(store, "c", "stage_time", 4.0, stage="u0", duration_ms=1)
    assert len(store) == 4                          # the oldest line of "a" went
    timeline = store.get("a")
    assert timeline is not None
    assert timeline["dropped_records"] == 0
    assert [r["fields"] for r in timeline["records"]] == [{"stage": "s1"}, {"stage": "s2"}]


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
        assert timeline is not None
        assert timeline["status"] == listed[rid]


def _voice_line(rid: str, t: float, voice: str) -> tuple[object, str, str, object]:
    line = json.dumps({"time": t, "level": "INFO", "event": "synthesis_complete",
                       "request_id": rid, "status": "success", "voice": voice,
                       "duration_ms": 12})
    return (rid, "synthesis_complete", line, "success")


def test_long_lines_are_kept_shortened_within_the_byte_bound() -> None:
    """60 KB voice names: what the store holds stays within max_bytes, measured."""
    max_bytes = 1 << 20
    store = TimelineStore(max_bytes=max_bytes, max_line_chars=1024)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in range(20):
            store.add("f", [_voice_line(f"r{batch}-{i}", batch + i / 100, "v" * 60_000)
                            for i in range(100)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.bytes <= max_bytes
    assert held < 2 * max_bytes, f"store holds {held} bytes"
    newest = store.get("r19-99")
    assert newest is not None
    assert newest["status"] == "success"
    voice = newest["records"][0]["fields"]["voice"]
    assert voice.startswith("vvv")
    assert voice.endswith("…")
    assert len(voice) < 1024
    assert store.get("r0-0") is None     # the oldest went first


def test_shorten_line_keeps_a_parsable_record_of_any_json_shape() -> None:
    line = json.dumps({"time": 1.0, "level": "ERROR", "event": "synthesis_complete",
                       "request_id": "r", "status": "failed", "error_code": "E",
                       "nested": {"deep": ["x" * 5000]},
                       **{f"k{i}": "y" * 300 for i in range(50)}})
    short = shorten_line(line, 1024)
    assert len(short) <= 1024
    parsed = PARSER.fields(short)
    assert parsed is not None
    assert parsed[1] == "synthesis_complete"
    assert parsed[2]["status"] == "failed"
    assert parsed[2]["truncated"] is True
    text = "2024-06-12 14:22:38,415 - app - INFO - synthesis_start: id=r1, voice=" + "v" * 5000
    assert shorten_line(text, 300) == text[:300]


def test_an_allow_list_limits_the_fields_a_timeline_shows() -> None:
    store = TimelineStore(fields=["stage", "duration_ms"])
    _add(store, "r", "stage_time", 1.0, stage="llm", duration_ms=5, text="secret text",
         message="secret")
    timeline = store.get("r")
    assert timeline is not None
    assert timeline["records"][0]["fields"] == {"stage": "llm", "duration_ms": 5}
    assert "secret" not in json.dumps(timeline)


@pytest.mark.slow
async def test_listing_requests_does_not_stall_the_gate(tmp_path: Path) -> None:
    """16 clients asking /requests for a billion entries of a big store: GET /ingress still
    answers faster than one scan of the store takes (the scans run off the event loop)."""
    store = TimelineStore(max_lines=60_000, max_bytes=1 << 30)
    for start in range(0, 60_000, 1000):
        store.add("f", [_voice_line(f"r{i}", float(i), "v") for i in range(start, start + 1000)])
    started = time.perf_counter()
    store.recent(None, 1000)
    scan_s = time.perf_counter() - started
    metrics = SidecarMetrics()
    gate_config = GateConfig(gate_file=str(tmp_path / "ingress.json"))
    gate = GateComponent(Gate.from_config(gate_config, stale_after_s=2.0), gate_config,
                         AuthConfig(), metrics)
    await gate.start()
    server = TestServer(build_app(metrics, [*gate.routes, *TimelineComponent(store).routes]))
    await server.start_server()
    try:
        assert server.port is not None
        latencies = await gate_latencies_while_hammered(
            server.port, "/requests?limit=1000000000", clients=16)
    finally:
        await server.close()
    assert statistics.median(latencies) < scan_s, (statistics.median(latencies), scan_s)


def test_a_timeline_shows_the_length_of_the_text_never_the_text() -> None:
    """IndexTTS writes the text to be spoken on its start lines (issue 18): /requests/{id}
    gives its length, in the text format and in JSON, also where the line is an error."""
    store = TimelineStore()
    line = ('2024-06-12 14:22:37,892 - app.tts_engine - ERROR - synthesis_start: id=ts_7f3a, '
            'text="今天天气真好", lang=zh, error_code=BAD_TEXT')
    parsed = PARSER.fields(line)
    assert parsed is not None
    store.add("f", [("ts_7f3a", parsed[1], line, None)])
    _add(store, "ts_7f3a", "synthesis_complete", 1718200000.0, text="secret words",
         status="success")
    timeline = store.get("ts_7f3a")
    assert timeline is not None
    shown = json.dumps(timeline, ensure_ascii=False)
    assert "今天天气真好" not in shown
    assert "secret words" not in shown
    assert [r["fields"]["text_len"] for r in timeline["records"]] == [6, 12]
    assert timeline["errors"][0]["error_code"] == "BAD_TEXT"


def test_a_batch_of_ids_of_any_json_type_and_size_is_kept_within_its_bounds() -> None:
    """Number, list and boolean ids (a JSON log may write any) in one batch with an over-long
    id and an over-long line: each kept, the long ones cut, the bytes still counted."""
    store = TimelineStore(max_line_chars=300, max_bytes=1 << 20)
    line = '{"event": "stage_time", "id": %s, "stage": "llm"}'
    batch: list[KeptLine] = [(7, "stage_time", line % 7, None),
             ([1, 2], "stage_time", line % "[1, 2]", None),
             (True, "stage_time", line % "true", None),
             ("r" * 500, "stage_time", line % ('"' + "r" * 500 + '"'), None),
             ("ok", "stage_time", line % '"ok"' + " " * 400, None)]
    store.add("f", batch)
    assert len(store) == 5
    assert store.get("7") is not None
    assert store.get("r" * 128) is not None           # ids are cut to 128 characters
    kept = store._snapshot()
    assert all(len(kept_line) <= 300 for _, _, kept_line, _ in kept)
    assert 5 * 120 < store.bytes < 1 << 20
    store.add("f", [("ok", "stage_time", line % '"ok"', None)])  # the fast path after it
    assert len(store) == 6
