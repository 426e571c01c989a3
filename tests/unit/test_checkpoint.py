"""The checkpoint: atomic writes, corrupt files moved aside, and exact totals across a restart
at any point (the component is dropped without a clean stop, as ``kill -9`` would)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from exporter.config import Config, LogsConfig, MetricsConfig
from exporter.logs.checkpoint import FORMAT_VERSION, Checkpoint, CheckpointStore, FileOffset
from exporter.logs.component import LogTailComponent
from exporter.logs.tailer import fingerprint, identity
from exporter.metrics import SidecarMetrics
from exporter.server import build_registry
from tests.conftest import FakeClock
from tests.unit.test_tailer import RecordingSink, append, async_wait_for, numbered


def sample_checkpoint() -> Checkpoint:
    return Checkpoint([FileOffset("logs/app.log", 2049, 131, "ab" * 16, 256, 52311)],
                      {"tts_exporter_log_lines": [[["parsed"], 812.0]]})


def test_save_then_load_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state" / "offsets.json")
    store.save(sample_checkpoint())
    assert store.load() == sample_checkpoint()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["offsets.json"]


def test_save_replaces_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "offsets.json")
    store.save(sample_checkpoint())
    store.save(Checkpoint([], {}))
    assert store.load() == Checkpoint([], {})


def test_missing_checkpoint_is_a_first_start(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "absent.json").load() is None


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe\x00", b"[]", b'{"version": 99, "files": [], "metrics": {}}',
    b'{"version": 1, "files": [{"path": "x"}], "metrics": {}}',
    b'{"version": 1, "files": [], "metrics": []}',
    b'{"version": 1, "files": [{"path": "x", "dev": 1, "ino": 2, "fingerprint": "", '
    b'"fingerprint_len": 0, "offset": -5}], "metrics": {}}',
])
def test_a_corrupt_checkpoint_is_moved_aside_and_logged(
        tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "offsets.json"
    path.write_bytes(content)
    store = CheckpointStore(path, clock=lambda: 1700000000.0)
    with caplog.at_level(logging.ERROR):
        assert store.load() is None
    assert not path.exists()
    assert (tmp_path / "offsets.json.corrupt-1700000000").read_bytes() == content
    assert str(path) in caplog.text
    assert "from the start" in caplog.text


# --- the component's checkpointing -----------------------------------------------------------


class Rig:
    """A log dir, a checkpoint path and a way to build the component as a fresh process
    would (new metrics, new sink), all sharing one fake clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "logs" / "app.log"
        self.log.parent.mkdir()
        self.config = LogsConfig(paths=[str(tmp_path / "logs" / "*.log")],
                                 checkpoint_path=str(tmp_path / "state" / "offsets.json"),
                                 checkpoint_interval_s=1.0, read_chunk_bytes=64)
        self.clock = FakeClock()

    def component(self) -> tuple[LogTailComponent, SidecarMetrics, RecordingSink]:
        metrics = SidecarMetrics()
        sink = RecordingSink(metrics)
        component = LogTailComponent(self.config, metrics, sink, clock=self.clock)
        component.restore()
        return component, metrics, sink


    def pipeline_component(self, metrics_config: MetricsConfig | None = None) \
            -> tuple[LogTailComponent, SidecarMetrics]:
        """The component as the sidecar builds it (the real pipeline as its sink), restored."""
        metrics = SidecarMetrics()
        component = LogTailComponent.from_config(
            Config(logs=self.config, metrics=metrics_config or MetricsConfig()), metrics)
        component.restore()
        return component, metrics


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_checkpoints_at_most_every_interval_and_only_after_a_change(rig: Rig) -> None:
    component, _, _ = rig.component()
    store = component.store
    component.step()  # the first pass writes the first checkpoint
    first = store.path.stat().st_mtime_ns
    append(rig.log, ["a"])
    component.step()
    saved = store.load()
    assert saved is not None
    assert saved.files == []  # not due yet: still the empty one
    rig.clock.now += 1.0
    component.step()
    saved = store.load()
    assert saved is not None
    assert [f.offset for f in saved.files] == [2]
    assert store.path.stat().st_mtime_ns >= first
    rig.clock.now += 5.0
    assert component.checkpoint() is False  # nothing changed since


def test_counters_in_the_checkpoint_match_its_offsets(rig: Rig) -> None:
    component, _, _ = rig.component()
    append(rig.log, numbered("x", 0, 7))
    component.step()
    saved = component.store.load()
    assert saved is not None
    lines = dict((tuple(k), v) for k, v in saved.metrics["tts_exporter_log_lines"])
    assert lines[("parsed",)] == 7
    assert saved.files[0].offset == rig.log.stat().st_size
    assert saved.metrics["tts_exporter_log_bytes_read"] == [[[], rig.log.stat().st_size]]
    assert saved.files[0].fingerprint == fingerprint(identity(rig.log.read_bytes()))


def test_restart_after_a_crash_at_random_points_gives_exact_totals(rig: Rig) -> None:
    """Crash (drop the component, no final checkpoint) after random passes; each new process
    restores the checkpoint and re-reads only what the checkpoint did not count."""
    rng = random.Random(7)
    written = 0
    component, metrics, _ = rig.component()
    for round_ in range(12):
        for _ in range(rng.randint(1, 4)):
            count = rng.randint(0, 30)
            append(rig.log, numbered(f"r{round_}", written, count))
            written += count
            if rng.random() < 0.3:
                with rig.log.open("a") as out:  # a partial line left for the next round
                    out.write(f"r{round_} partial ")
                written += 1
                with rig.log.open("a") as out:
                    out.write("line\n")
            rig.clock.now += rng.choice([0.2, 0.7, 1.5])
            component.step()
        if rng.random() < 0.6:
            component.tailer.close()
            component, metrics, _ = rig.component()  # kill -9, restart
    component.step()
    assert metrics.log_lines.get(("parsed",)) == written
    assert metrics.log_bytes.get() == rig.log.stat().st_size


def test_restart_finishes_a_file_rotated_while_down_and_reads_the_new_one(rig: Rig) -> None:
    config = LogsConfig(paths=[str(rig.log.parent / "app.log*")],
                        checkpoint_path=rig.config.checkpoint_path)
    rig.config = config
    component, _, _ = rig.component()
    append(rig.log, numbered("old", 0, 3))
    component.step()
    component.checkpoint()
    component.tailer.close()
    append(rig.log, numbered("old", 3, 2))  # written while the sidecar was down
    os.rename(rig.log, rig.log.with_name("app.log.1"))
    append(rig.log, numbered("new", 0, 2))
    component, metrics, sink = rig.component()
    component.step()
    assert sorted(sink.texts()) == sorted(numbered("old", 3, 2) + numbered("new", 0, 2))
    assert metrics.log_lines.get(("parsed",)) == 7


def test_a_recycled_inode_is_read_from_the_start(rig: Rig) -> None:
    """Same (dev, inode) as in the checkpoint but other first bytes: a new file."""
    append(rig.log, numbered("new file", 0, 4))
    st = rig.log.stat()
    stale = FileOffset(str(rig.log), st.st_dev, st.st_ino, fingerprint(b"something else"),
                       14, 30)
    CheckpointStore(rig.config.checkpoint_path).save(Checkpoint([stale], {}))
    component, metrics, sink = rig.component()
    component.step()
    assert sink.texts() == numbered("new file", 0, 4)
    assert metrics.log_rotations.get(("recreate",)) == 1


def test_a_file_truncated_while_down_is_read_from_the_start(rig: Rig) -> None:
    append(rig.log, numbered("long gone", 0, 10))
    component, _, _ = rig.component()
    component.step()
    component.tailer.close()
    rig.log.write_text("long gone but shorter\n")  # same first bytes, fewer of them
    component, metrics, sink = rig.component()
    component.step()
    assert sink.texts() == ["long gone but shorter"]
    assert metrics.log_rotations.get(("truncate",)) == 1
    assert metrics.log_lines.get(("parsed",)) == 11


def test_a_corrupt_checkpoint_restarts_from_the_files_start(rig: Rig) -> None:
    append(rig.log, numbered("x", 0, 5))
    path = Path(rig.config.checkpoint_path)
    path.parent.mkdir()
    path.write_text('{"version": 1, "files": [')
    component, _, sink = rig.component()
    component.step()
    assert sink.texts() == numbered("x", 0, 5)
    assert json.loads(path.read_text())["version"] == FORMAT_VERSION  # a fresh one replaced it
    assert len(list(path.parent.glob("offsets.json.corrupt-*"))) == 1


def test_an_unwritable_checkpoint_is_counted_and_tailing_goes_on(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    Path(rig.config.checkpoint_path).parent.write_text("a file where the state dir should be")
    component, metrics, sink = rig.component()
    append(rig.log, ["still counted"])
    component.step()
    assert sink.texts() == ["still counted"]
    assert metrics.collector_errors.get(("tail",)) == 1
    assert "cannot write log checkpoint" in caplog.text


async def test_stop_and_start_the_running_component_keeps_exact_totals(rig: Rig) -> None:
    rig.config = LogsConfig(paths=rig.config.paths, checkpoint_path=rig.config.checkpoint_path,
                            poll_interval_s=0.05)
    total = 0
    for round_ in range(3):
        metrics = SidecarMetrics()
        sink = RecordingSink(metrics)
        component = LogTailComponent(rig.config, metrics, sink)
        await component.start()
        try:
            append(rig.log, numbered(f"round{round_}", 0, 20))
            total += 20
            await async_wait_for(lambda: metrics.log_lines.get(("parsed",)) == total)  # noqa: B023
            assert len(sink.lines()) == 20  # only this round's lines were read
        finally:
            await component.stop()
    assert metrics.log_lines.get(("parsed",)) == total


class SlowSink(RecordingSink):
    """Costs about what the real pipeline does per line (a few microseconds), keeps nothing."""

    pattern = re.compile(r"^(\S+ \S+) - (\S+) - (\w+) - (.*)$")

    def process(self, source: str, data: bytes) -> None:
        lines = data.split(b"\n")
        for line in lines:
            match = self.pattern.match(line.decode("utf-8", "replace"))
            if match:
                dict(zip(("time", "logger", "level", "message"), match.groups(), strict=True))
        self.metrics.log_lines.inc(("parsed",), len(lines) - 1)


def write_backlog(path: Path, lines: int) -> None:
    path.write_bytes(b"".join(b"2026-11-22 23:59:59,123 - app - INFO - backlog line %08d\n" % i
                              for i in range(lines)))


class CrawlingSink(SlowSink):
    """A pipeline slow enough that a backlog takes seconds."""

    def process(self, source: str, data: bytes) -> None:
        super().process(source, data)
        time.sleep(0.005)


async def test_stop_during_a_long_backlog_is_prompt_and_its_checkpoint_exact(rig: Rig) -> None:
    write_backlog(rig.log, 100_000)
    metrics = SidecarMetrics()
    component = LogTailComponent(LogsConfig(paths=rig.config.paths,
                                            checkpoint_path=rig.config.checkpoint_path,
                                            read_chunk_bytes=16 * 1024),
                                 metrics, CrawlingSink(metrics))
    await component.start()
    await async_wait_for(lambda: metrics.log_lines.get(("parsed",)) > 0)
    began = time.monotonic()
    await component.stop()
    assert time.monotonic() - began < 0.5
    saved = component.store.load()
    assert saved is not None
    offset = saved.files[0].offset
    assert 0 < offset < rig.log.stat().st_size  # stopped mid-backlog
    counted = dict((tuple(k), v) for k, v in saved.metrics["tts_exporter_log_lines"])
    assert counted[("parsed",)] == rig.log.read_bytes()[:offset].count(b"\n")


def test_scrapes_stay_responsive_while_a_backlog_is_read(rig: Rig) -> None:
    """The metrics lock is held per batch, never for the whole backlog."""
    write_backlog(rig.log, 300_000)
    metrics = SidecarMetrics()
    tailer = LogTailComponent(rig.config, metrics, SlowSink(metrics)).tailer
    tailer.chunk = 1 << 20
    worker = threading.Thread(target=tailer.poll)
    worker.start()
    waits = []
    while worker.is_alive():
        began = time.perf_counter()
        list(metrics.metric_set.collect())
        waits.append(time.perf_counter() - began)
        time.sleep(0.001)
    worker.join()
    assert metrics.log_lines.get(("parsed",)) == 300_000
    assert len(waits) >= 5, waits
    assert max(waits) < 0.05, f"slowest scrape {max(waits):.3f}s"


# --- a checkpoint whose metrics do not validate (issue 14 finding 4) -----------------------


def synthesis_lines(count: int) -> str:
    return "".join(json.dumps({
        "time": "2026-11-22T10:00:00.000+00:00", "level": "ERROR" if i % 3 else "INFO",
        "event": "synthesis_complete", "request_id": f"r{i}",
        "status": "failed" if i % 3 else "success", "error_code": f"E{i % 4}",
        "duration_ms": 100 + i, "text_len": i, "queue_ms": 5}) + "\n" for i in range(count))


def read_all(rig: Rig) -> tuple[dict[str, Any], SidecarMetrics]:
    """(a checkpoint written after reading the whole log, the totals of that read)."""
    component, metrics = rig.pipeline_component()
    component.step()                              # a first pass checkpoints at once
    return json.loads(Path(rig.config.checkpoint_path).read_text()), metrics


def totals(metrics: SidecarMetrics) -> dict[str, Any]:
    return metrics.log_state()


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def corrupt(metrics: dict[str, Any]) -> None:
        target: Any = metrics
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return corrupt


CORRUPTIONS = {
    "sample without its value": _set(("tts_syntheses", 0), [["failed", "E1"]]),
    "sample as an object": _set(("tts_syntheses", 0), {"labels": ["failed", "E1"]}),
    "series: 5": _set(("tts_synthesis_duration_seconds", "series"), 5),
    "one bucket short": _set(("tts_synthesis_duration_seconds", "series", 0, 1), [1] * 13),
    "bucket count as text": _set(("tts_text_length_chars", "series", 0, 1, 0), "3"),
    "NaN value": _set(("tts_syntheses", 0, 1), float("nan")),
    "infinite sum": _set(("tts_synthesis_duration_seconds", "series", 0, 2), float("inf")),
    "negative counter": _set(("tts_syntheses", 0, 1), -4.0),
    "huge bucket count": _set(("tts_queue_wait_seconds", "series", 0, 1, 0), 10**30),
    "label count": _set(("tts_syntheses", 0, 0), ["failed"]),
    "label as a number": _set(("tts_syntheses", 0, 0), ["failed", 7]),
    "bounds as text": _set(("tts_text_length_chars", "bounds"), "10,25"),
    "counter as an object": _set(("tts_exporter_log_lines",), {"parsed": 3}),
    "boolean value": _set(("tts_cache_lookups", 0, 1), True),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_checkpoint_with_malformed_metrics_is_moved_aside_and_totals_rebuilt(
        rig: Rig, corrupt: Callable[[dict[str, Any]], None],
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14 finding 4: such a checkpoint crashed start-up or made /metrics answer 500."""
    append(rig.log, [synthesis_lines(30)])
    saved, fresh = read_all(rig)
    corrupt(saved["metrics"])
    path = Path(rig.config.checkpoint_path)
    path.write_text(json.dumps(saved))
    with caplog.at_level(logging.ERROR):
        component, metrics = rig.pipeline_component()
    assert "not a valid checkpoint" in caplog.text
    assert len(list(path.parent.glob("offsets.json.corrupt-*"))) == 1
    component.step()
    assert totals(metrics) == totals(fresh)      # re-read from the start: no loss, no double
    assert generate_latest(build_registry(metrics))


def test_a_version_1_checkpoint_is_migrated_not_discarded(rig: Rig) -> None:
    """Version 1 counted label overflows by label only: its totals and offsets still hold."""
    append(rig.log, [synthesis_lines(30)])
    saved, fresh = read_all(rig)
    written_before_model_version(saved, version=1)
    saved["metrics"]["tts_exporter_label_overflow"] = [[["error_code"], 3.0]]
    path = Path(rig.config.checkpoint_path)
    path.write_text(json.dumps(saved))
    component, metrics = rig.pipeline_component()
    component.step()
    assert not list(path.parent.glob("offsets.json.corrupt-*"))
    assert metrics.label_overflow.values == {("unknown", "error_code"): 3.0}
    expected = totals(fresh)
    expected["tts_exporter_label_overflow"] = [[["unknown", "error_code"], 3.0]]
    assert totals(metrics) == expected             # resumed at the offsets: nothing twice


def written_before_model_version(saved: dict[str, Any], version: int) -> None:
    """``saved`` as a version 1 or 2 sidecar wrote it: syntheses without model_version."""
    saved["version"] = version
    for sample in saved["metrics"]["tts_syntheses"]:
        sample[0] = sample[0][:2]


def test_a_checkpoint_from_before_model_version_loads_with_it_unknown(rig: Rig) -> None:
    """Issue 18: syntheses gained a model_version label; older totals keep counting."""
    append(rig.log, [synthesis_lines(30)])
    saved, fresh = read_all(rig)
    written_before_model_version(saved, version=2)
    assert all(len(labels) == 2 for labels, _ in saved["metrics"]["tts_syntheses"])
    path = Path(rig.config.checkpoint_path)
    path.write_text(json.dumps(saved))
    component, metrics = rig.pipeline_component()
    component.step()
    assert not list(path.parent.glob("offsets.json.corrupt-*"))
    assert {labels[2] for labels in metrics.syntheses.values} == {"unknown"}
    assert totals(metrics) == totals(fresh)


def test_a_version_3_checkpoint_gets_the_error_and_length_class_labels(rig: Rig) -> None:
    """Issue 19 #2: version 3 had no `error` label on tts_http_requests_total and no
    `length_class` on tts_synthesis_duration_seconds; its series take those labels' defaults
    instead of failing the checkpoint's validation (which would re-read every log)."""
    append(rig.log, [synthesis_lines(3)])
    saved, _ = read_all(rig)
    saved["version"] = 3
    saved["metrics"]["tts_http_requests"] = [[["POST", "/v1/tts", "200"], 5.0],
                                             [["POST", "/v1/tts", "503"], 2.0]]
    durations = saved["metrics"]["tts_synthesis_duration_seconds"]
    counts = [sum(column) for column in zip(*(s[1] for s in durations["series"]), strict=True)]
    durations["series"] = [[[], counts, 0.3]]
    path = Path(rig.config.checkpoint_path)
    path.write_text(json.dumps(saved))
    component, metrics = rig.pipeline_component()
    component.step()
    assert not list(path.parent.glob("offsets.json.corrupt-*"))
    assert metrics.http_requests.values == {("POST", "/v1/tts", "200", "none"): 5.0,
                                            ("POST", "/v1/tts", "503", "other"): 2.0}
    assert metrics.synthesis_duration.count(("unknown",)) == 3
    assert metrics.synthesis_duration.total(("unknown",)) == 0.3
