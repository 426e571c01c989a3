"""The tailer on real files: batches of whole lines, partial and too-long lines, and every
rotation mode with lines written before, during and after it (none lost, none twice).

Most tests drive :meth:`Tailer.poll` pass by pass; the last ones go through the real inotify
watch and worker thread with bounded waits (5 s where the poll alone would take 30 s)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import LogsConfig
from exporter.logs.component import LogTailComponent, watch_root
from exporter.logs.tailer import Tailer, drop_long_lines
from exporter.metrics import SidecarMetrics

from .conftest import InotifyLimits


class RecordingSink:
    """Stands in for the pipeline: keeps what it got and counts each line as the pipeline
    would (one ``tts_exporter_log_lines_total`` increment per line)."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self.metrics = metrics
        self.calls: list[tuple[str, bytes]] = []
        self.forgotten: list[str] = []

    def process(self, source: str, data: bytes) -> None:
        assert self.metrics.updating().locked(), "process() must run under the lock"
        assert data.endswith(b"\n")
        self.calls.append((source, data))
        self.metrics.log_lines.inc(("parsed",), data.count(b"\n"))

    def forget(self, source: str) -> None:
        self.forgotten.append(source)

    def lines(self) -> list[bytes]:
        return [line for _, data in self.calls for line in data.splitlines(keepends=True)]

    def texts(self) -> list[str]:
        return [line.decode().rstrip("\n") for line in self.lines()]


def numbered(prefix: str, start: int, count: int) -> list[str]:
    return [f"{prefix} line {i}" for i in range(start, start + count)]


def append(path: Path, lines: list[str]) -> None:
    with path.open("a") as out:
        out.writelines(line + "\n" for line in lines)


@pytest.fixture
def metrics() -> SidecarMetrics:
    return SidecarMetrics()


@pytest.fixture
def sink(metrics: SidecarMetrics) -> RecordingSink:
    return RecordingSink(metrics)


def tailer_for(tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink,
               pattern: str = "*.log", max_line_bytes: int = 65536,
               read_chunk_bytes: int = 1 << 20) -> Tailer:
    return Tailer([str(tmp_path / pattern)], metrics, sink, max_line_bytes, read_chunk_bytes)


def rotations(metrics: SidecarMetrics) -> dict[str, float]:
    return {labels[0]: value for labels, value in metrics.log_rotations.values.items()}


# --- lines -------------------------------------------------------------------------------


def test_complete_lines_go_out_in_one_batch_and_a_partial_line_waits(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    log = tmp_path / "app.log"
    append(log, numbered("a", 0, 1000))
    with log.open("a") as out:
        out.write("half a li")
    tailer = tailer_for(tmp_path, metrics, sink)
    tailer.poll()
    assert len(sink.calls) == 1
    assert sink.calls[0][0] == str(log)
    assert sink.texts() == numbered("a", 0, 1000)
    with log.open("a") as out:
        out.write("ne\n")
    tailer.poll()
    assert sink.texts()[-1] == "half a line"
    assert metrics.log_bytes.get() == log.stat().st_size
    assert metrics.log_lag.get((str(log),)) == 0.0


def test_partial_line_is_not_counted_in_bytes_or_lag_until_its_newline(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"done\nnot yet")
    tailer = tailer_for(tmp_path, metrics, sink)
    tailer.poll()
    assert metrics.log_bytes.get() == 5
    assert metrics.log_lag.get((str(log),)) == len(b"not yet")


def test_crlf_and_invalid_utf8_pass_through_as_bytes(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    raw = b"windows line\r\n\xff\xfe not utf-8 \xc3\x28\n\xe4\xbb\x8a\xe5\xa4\xa9\n"
    (tmp_path / "app.log").write_bytes(raw)
    tailer_for(tmp_path, metrics, sink).poll()
    assert b"".join(data for _, data in sink.calls) == raw


def test_reads_in_chunks_and_reassembles_lines_split_between_them(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    lines = numbered("chunky", 0, 300)
    append(tmp_path / "app.log", lines)
    tailer_for(tmp_path, metrics, sink, read_chunk_bytes=7).poll()
    assert sink.texts() == lines


def test_a_too_long_line_is_counted_and_skipped(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    log = tmp_path / "app.log"
    append(log, ["short 1", "x" * 50, "short 2", "y" * 20, "z" * 21])
    tailer_for(tmp_path, metrics, sink, max_line_bytes=20).poll()
    assert sink.texts() == ["short 1", "short 2", "y" * 20]
    assert metrics.log_lines.get(("too_long",)) == 2
    assert metrics.log_bytes.get() == log.stat().st_size


@pytest.mark.parametrize("chunk", [4, 16, 64, 1 << 20])
def test_a_too_long_line_across_reads_and_passes_counts_once(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink, chunk: int) -> None:
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink, max_line_bytes=30, read_chunk_bytes=chunk)
    append(log, ["before"])
    with log.open("a") as out:
        out.write("L" * 100)
    tailer.poll()
    with log.open("a") as out:
        out.write("L" * 100)
    tailer.poll()
    assert metrics.log_lines.get(("too_long",)) == 0  # not over until its newline
    with log.open("a") as out:
        out.write("L\nafter\n")
    tailer.poll()
    assert sink.texts() == ["before", "after"]
    assert metrics.log_lines.get(("too_long",)) == 1
    assert metrics.log_bytes.get() == log.stat().st_size


def naive_drop(data: bytes, cap: int) -> tuple[bytes, int]:
    lines = data.split(b"\n")[:-1]
    kept = [line + b"\n" for line in lines if len(line) <= cap]
    return b"".join(kept), len(lines) - len(kept)


@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=30),
       st.integers(min_value=1, max_value=25))
def test_drop_long_lines_matches_a_line_by_line_check(lengths: list[int], cap: int) -> None:
    data = b"".join(b"a" * n + b"\n" for n in lengths)
    assert drop_long_lines(data, cap) == naive_drop(data, cap)


# --- which files --------------------------------------------------------------------------


def test_files_appearing_later_are_read_from_the_start_and_gz_never(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    tailer = Tailer([str(tmp_path / "*.log*"), str(tmp_path / "sub" / "**" / "*.log")],
                    metrics, sink)
    tailer.poll()
    assert sink.calls == []
    append(tmp_path / "later.log", ["late 1"])
    (tmp_path / "old.log.1.gz").write_bytes(b"\x1f\x8b not to be read\n")
    append(tmp_path / "other.txt", ["not matched"])
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    append(tmp_path / "sub" / "deep" / "nested.log", ["nested 1"])
    tailer.poll()
    assert sorted(sink.texts()) == ["late 1", "nested 1"]


def test_an_unreadable_path_is_counted_and_the_others_still_tailed(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "loop.log").symlink_to(tmp_path / "loop.log")  # stat fails: ELOOP
    append(tmp_path / "good.log", ["fine"])
    tailer = tailer_for(tmp_path, metrics, sink)
    tailer.poll()
    tailer.poll()
    assert sink.texts() == ["fine"]
    assert metrics.collector_errors.get(("tail",)) == 2
    errors = [r for r in caplog.records if "loop.log" in r.getMessage()]
    assert len(errors) == 1
    assert errors[0].levelname == "ERROR"  # logged once, counted each time


# --- rotations ----------------------------------------------------------------------------


def test_rename_rotation_finishes_the_old_file_then_reads_the_new_one(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink)
    append(log, numbered("before", 0, 5))
    tailer.poll()
    writer = log.open("a")
    writer.write("during 0\n")
    writer.flush()
    os.rename(log, tmp_path / "app.log.1")  # out of the glob's reach
    writer.write("during 1\n")  # the app has not reopened yet
    writer.close()
    append(log, numbered("after", 0, 3))
    tailer.poll()
    tailer.poll()
    assert sink.texts() == [*numbered("before", 0, 5), "during 0", "during 1",
                            *numbered("after", 0, 3)]
    assert rotations(metrics) == {"rename": 1}
    assert len(tailer.files) == 1  # the rotated file was closed once finished
    append(log, ["after 3"])
    tailer.poll()
    assert sink.texts()[-1] == "after 3"
    assert len(sink.lines()) == 11


def test_rename_into_a_name_the_glob_matches_keeps_the_offset(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    """logrotate-style generations under ``app.log*``: shifting .1 to .2 is not a rotation of
    its own, and no generation is read twice."""
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink, pattern="app.log*")
    expected: list[str] = []
    for generation in range(3):
        lines = numbered(f"gen{generation}", 0, 4)
        append(log, lines[:2])
        tailer.poll()
        append(log, lines[2:])
        for older in range(generation, 0, -1):
            os.rename(tmp_path / f"app.log.{older}", tmp_path / f"app.log.{older + 1}")
        os.rename(log, tmp_path / "app.log.1")
        append(log, [f"new after gen{generation}"])
        expected += [*lines, f"new after gen{generation}"]
        tailer.poll()
        os.rename(log, tmp_path / "app.log.tmp")
        os.rename(tmp_path / "app.log.tmp", log)  # a file moved away and back: no rotation
        tailer.poll()
    assert sorted(sink.texts()) == sorted(expected)
    assert rotations(metrics) == {"rename": 3}


def test_copytruncate_reads_the_tail_from_the_copy_then_the_file_from_zero(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink)
    append(log, numbered("before", 0, 5))
    tailer.poll()
    append(log, numbered("during", 0, 2))  # unread when logrotate copies
    shutil.copyfile(log, tmp_path / "app.log.1")
    with log.open("r+") as out:
        out.truncate(0)
    append(log, numbered("after", 0, 2))
    tailer.poll()
    tailer.poll()
    assert sink.texts() == numbered("before", 0, 5) + numbered("during", 0, 2) + \
        numbered("after", 0, 2)
    assert rotations(metrics) == {"truncate": 1}
    assert str(log) in sink.forgotten


@pytest.mark.parametrize("after_count", [1, 50])
def test_plain_truncation_is_detected_by_size_or_by_first_bytes(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink, after_count: int) -> None:
    """Fewer bytes than the offset, or as many or more but different first bytes: both are a
    truncation, and the new content is read from 0."""
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink)
    append(log, numbered("before", 0, 10))
    tailer.poll()
    with log.open("w") as out:  # `> app.log`, then the app goes on writing
        out.writelines(line + "\n" for line in numbered("after", 0, after_count))
    tailer.poll()
    assert sink.texts() == numbered("before", 0, 10) + numbered("after", 0, after_count)
    assert rotations(metrics) == {"truncate": 1}
    assert metrics.log_bytes.get() == len("".join(
        f"{line}\n" for line in numbered("before", 0, 10) + numbered("after", 0, after_count)))


def test_delete_and_recreate_finishes_the_deleted_file_first(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink)
    append(log, numbered("before", 0, 3))
    tailer.poll()
    writer = log.open("a")
    writer.write("during 0\n")
    writer.flush()
    log.unlink()
    writer.write("during 1\n")  # still reachable through our open descriptor
    writer.close()
    append(log, numbered("after", 0, 2))
    tailer.poll()
    tailer.poll()
    assert sink.texts() == [*numbered("before", 0, 3), "during 0", "during 1",
                            *numbered("after", 0, 2)]
    assert rotations(metrics) == {"recreate": 1}


def test_delete_then_recreate_in_a_later_pass_is_counted_once_and_lag_follows(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink)
    log.write_bytes(b"one\nunterminated")
    tailer.poll()
    assert metrics.log_lag.get((str(log),)) == len(b"unterminated")
    log.unlink()
    tailer.poll()
    tailer.poll()
    # The file is gone for good: its last line is complete now, its lag series goes.
    assert sink.texts() == ["one", "unterminated"]
    assert metrics.log_lag.get((str(log),)) is None
    assert sink.forgotten == [str(log)]
    append(log, ["two"])
    tailer.poll()
    assert sink.texts()[-1] == "two"
    assert rotations(metrics) == {"recreate": 1}
    assert metrics.log_lag.get((str(log),)) == 0.0


def test_several_files_are_followed_independently(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    tailer = tailer_for(tmp_path, metrics, sink)
    for round_ in range(3):
        for name in ("a", "b", "c"):
            append(tmp_path / f"{name}.log", numbered(name, round_ * 2, 2))
        tailer.poll()
    by_source: dict[str, list[str]] = {}
    for source, data in sink.calls:
        by_source.setdefault(Path(source).name, []).extend(data.decode().splitlines())
    assert by_source == {f"{name}.log": numbered(name, 0, 6) for name in ("a", "b", "c")}


# --- copies under a glob that also matches the backups (``app.log*``) ----------------------


class Scenario:
    """An app log under ``app.log*`` with logrotate's steps as methods, a tailer, and
    ``kill -9`` modelled as the checkpoint does it: offsets and counted lines taken together,
    a restart resumes from the last checkpoint and forgets whatever was counted after it."""

    def __init__(self, tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
        self.dir, self.metrics, self.sink = tmp_path, metrics, sink
        self.log = tmp_path / "app.log"
        self.written: list[str] = []
        self.tailer = tailer_for(tmp_path, metrics, sink, pattern="app.log*")
        self.saved: tuple[list[object], int] = ([], 0)

    def write(self, count: int, partial: str = "") -> None:
        lines = numbered(f"w{len(self.written)}", 0, count)
        with self.log.open("a") as out:
            out.writelines(line + "\n" for line in lines)
            out.write(partial)
        self.written += lines

    def finish_line(self, rest: str) -> None:
        """The rest of a line ``write`` left partial (the app was mid-line)."""
        with self.log.open("a") as out:
            out.write(rest + "\n")

    def copy(self) -> None:
        shutil.copyfile(self.log, self.dir / "app.log.1")

    def truncate(self) -> None:
        with self.log.open("r+") as out:
            out.truncate(0)

    def compress_previous(self) -> None:
        """delaycompress: last cycle's plain ``app.log.1`` becomes ``app.log.2.gz``."""
        backup = self.dir / "app.log.1"
        if backup.exists():
            os.rename(backup, self.dir / "app.log.2")
            with gzip.open(self.dir / "app.log.2.gz", "wb") as out:
                out.write((self.dir / "app.log.2").read_bytes())
            (self.dir / "app.log.2").unlink()

    def poll(self) -> None:
        self.tailer.poll()

    def checkpoint(self) -> None:
        self.saved = (list(self.tailer.snapshot()), len(self.sink.calls))

    def kill_and_restart(self) -> None:
        self.tailer.close()
        offsets, calls = self.saved
        del self.sink.calls[calls:]
        self.tailer = tailer_for(self.dir, self.metrics, self.sink, pattern="app.log*")
        self.tailer.resume(offsets)  # type: ignore[arg-type]
        self.tailer.poll()  # the sidecar reads as soon as it is back

    def counted(self) -> list[str]:
        self.poll()
        self.poll()
        return sorted(self.sink.texts())


COPYTRUNCATE_STEPS = ["write", "poll", "write", "copy", "write", "poll", "truncate", "write",
                      "poll", "compress_previous", "copy", "truncate", "write", "poll", "write",
                      "compress_previous", "copy", "poll", "truncate", "write"]


def run_steps(scenario: Scenario, steps: list[str], checkpoint_at: int = -1,
              kill_at: int = -1) -> None:
    for index, step in enumerate(steps):
        if step == "write":
            scenario.write(5)
        else:
            getattr(scenario, step)()
        if index == checkpoint_at:
            scenario.checkpoint()
        if index == kill_at:
            scenario.kill_and_restart()


@pytest.mark.parametrize("poll_between", [False, True])
def test_copytruncate_under_a_glob_matching_the_copy_counts_each_line_once(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink, poll_between: bool) -> None:
    """``cp app.log app.log.1; : > app.log`` with ``app.log*``: the copy is the content
    already read, not a new file (whether the tailer sees it before or after the truncate)."""
    scenario = Scenario(tmp_path, metrics, sink)
    scenario.write(100)
    scenario.poll()
    scenario.write(10)  # not read yet when logrotate copies
    scenario.copy()
    if poll_between:
        scenario.poll()
    scenario.truncate()
    scenario.write(5)
    assert scenario.counted() == sorted(scenario.written)
    assert len(sink.lines()) == 115
    assert rotations(metrics) == {"truncate": 1}


def test_a_copy_made_while_the_app_writes_counts_the_lines_after_the_copy_once(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    """The app goes on writing between ``cp`` and the truncate, even mid-line at the copy:
    those lines are in app.log only (read there, before the truncate); the copy ends before
    them and adds nothing."""
    scenario = Scenario(tmp_path, metrics, sink)
    scenario.write(20)
    scenario.poll()
    scenario.write(3, partial="cut by the co")
    scenario.copy()
    scenario.finish_line("py")
    scenario.written.append("cut by the copy")
    scenario.write(4)
    scenario.poll()
    scenario.truncate()
    scenario.write(2)
    assert scenario.counted() == sorted(scenario.written)
    assert not any(text in ("cut by the co", "py") for text in sink.texts())


def test_delaycompress_reads_the_plain_copy_once_and_never_the_gz(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    scenario = Scenario(tmp_path, metrics, sink)
    for _ in range(4):
        scenario.write(30)
        scenario.poll()
        scenario.write(3)
        scenario.compress_previous()
        scenario.copy()
        scenario.truncate()
        scenario.write(2)
        scenario.poll()
    assert (tmp_path / "app.log.2.gz").exists()
    assert scenario.counted() == sorted(scenario.written)
    assert rotations(metrics) == {"truncate": 4}


@pytest.mark.parametrize("kill_at", range(len(COPYTRUNCATE_STEPS)))
def test_copytruncate_and_delaycompress_stay_exact_across_kill_9_at_any_step(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink, kill_at: int) -> None:
    """Killed after any step, resumed from the checkpoint of that step, of two steps before,
    or from none: every written line counted exactly once. (A checkpoint older than a
    truncate is left out: lines counted after it and truncated away are gone from disk.)"""
    stale = [at for at in (kill_at - 2, -1)
             if "truncate" not in COPYTRUNCATE_STEPS[at + 1:kill_at + 1]]
    for checkpoint_at in sorted({kill_at, *stale}):
        for leftover in tmp_path.iterdir():
            leftover.unlink()
        sink.calls.clear()
        scenario = Scenario(tmp_path, metrics, sink)
        run_steps(scenario, COPYTRUNCATE_STEPS, checkpoint_at, kill_at)
        assert scenario.counted() == sorted(scenario.written), (kill_at, checkpoint_at)
        scenario.tailer.close()


def test_rename_rotation_under_a_glob_matching_the_backup_is_finished_not_reread(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    """app.log -> app.log.1 is the same device and inode: finished under its new name, never
    read again, also after a restart that finds it there."""
    scenario = Scenario(tmp_path, metrics, sink)
    scenario.write(10)
    scenario.poll()
    scenario.checkpoint()
    writer = scenario.log.open("a")
    os.rename(scenario.log, tmp_path / "app.log.1")
    writer.write("still the old file\n")  # the app has not reopened yet
    writer.close()
    scenario.written.append("still the old file")
    scenario.write(3)
    scenario.kill_and_restart()
    assert scenario.counted() == sorted(scenario.written)
    assert rotations(metrics) == {}  # found under its new name at restart: not a rotation


def test_a_file_moved_out_of_the_globs_and_back_continues_at_its_offset(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    """Same device and inode, same first bytes: the same file, in a later pass too."""
    log = tmp_path / "app.log"
    tailer = tailer_for(tmp_path, metrics, sink)
    append(log, numbered("a", 0, 5))
    tailer.poll()
    os.rename(log, tmp_path / "parked")
    tailer.poll()
    assert tailer.files == {}
    append(tmp_path / "parked", ["a line 5"])
    os.rename(tmp_path / "parked", log)
    tailer.poll()
    assert sink.texts() == numbered("a", 0, 6)


# --- through the inotify watch and the worker thread ---------------------------------------


def wait_for(predicate: object, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def async_wait_for(predicate: object, timeout: float = 3.0) -> None:
    await asyncio.to_thread(wait_for, predicate, timeout)


def test_watch_root_is_the_directory_before_the_first_wildcard() -> None:
    assert watch_root("/var/log/tts/*.log") == ("/var/log/tts", False)
    assert watch_root("/var/log/*/app.log") == ("/var/log", True)
    assert watch_root("/var/log/app.log") == ("/var/log", False)


@contextlib.asynccontextmanager
async def running(component: LogTailComponent) -> AsyncIterator[LogTailComponent]:
    await component.start()
    try:
        yield component
    finally:
        await component.stop()


def tail_component(tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink, *patterns: str,
                   poll_interval_s: float = 30.0, min_pass_interval_s: float = 0.0,
                   ) -> LogTailComponent:
    """The component tailing ``patterns`` under ``tmp_path``; its checkpoint in state/."""
    config = LogsConfig(paths=[str(tmp_path / pattern) for pattern in patterns],
                        checkpoint_path=str(tmp_path / "state" / "offsets.json"),
                        poll_interval_s=poll_interval_s,
                        min_pass_interval_s=min_pass_interval_s)
    return LogTailComponent(config, metrics, sink)


def counting_passes(component: LogTailComponent) -> list[float]:
    """The start time of each of the component's read passes, from now on."""
    starts: list[float] = []
    poll = component.tailer.poll

    def counted_poll() -> int:
        starts.append(time.monotonic())
        return poll()

    component.tailer.poll = counted_poll  # type: ignore[method-assign]
    return starts


async def test_inotify_wakes_the_reader_long_before_the_poll(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "logs").mkdir()
    component = tail_component(tmp_path, metrics, sink, "logs/*.log")
    async with running(component):
        await asyncio.sleep(0.1)  # the first pass finds nothing
        append(tmp_path / "logs" / "app.log", ["woken"])
        await async_wait_for(lambda: sink.texts() == ["woken"], timeout=5.0)
        os.rename(tmp_path / "logs" / "app.log", tmp_path / "logs" / "app.log.1")
        append(tmp_path / "logs" / "app.log", ["rotated"])
        await async_wait_for(lambda: sink.texts() == ["woken", "rotated"], timeout=5.0)
    assert (tmp_path / "state" / "offsets.json").exists()


async def test_the_reader_waits_on_its_own_thread_with_no_helper_threads(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "logs" / "pod").mkdir(parents=True)
    component = tail_component(tmp_path, metrics, sink, "logs/*.log", "logs/**/*.log")

    def threads() -> set[str]:  # not asyncio.to_thread's pool
        return {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")}

    before = threads()
    async with running(component):
        append(tmp_path / "logs" / "pod" / "app.log", ["line"])
        await async_wait_for(lambda: sink.texts() == ["line"], timeout=5.0)
        assert threads() - before == {"log-tailer"}


async def test_a_burst_of_writes_costs_a_few_passes(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "logs").mkdir()
    component = tail_component(tmp_path, metrics, sink, "logs/*.log")
    starts = counting_passes(component)
    async with running(component):
        append(tmp_path / "logs" / "app.log", ["first"])
        await async_wait_for(lambda: sink.texts() == ["first"], timeout=5.0)
        before = len(starts)
        # The reader is held at the lock in its pass while the burst is written: the burst's
        # ~1,500 events are then all pending at the next wait, which must drain them at once.
        with metrics.updating():
            append(tmp_path / "logs" / "app.log", ["held"])
            await asyncio.sleep(0.3)
            for i in range(500):
                append(tmp_path / "logs" / "app.log", [f"burst {i}"])
        await async_wait_for(lambda: len(sink.texts()) == 502, timeout=5.0)
        await asyncio.sleep(0.3)
        assert len(starts) - before <= 4


@pytest.mark.parametrize("spacing", [0.0, 0.5])
async def test_a_steady_writer_is_read_in_passes_at_least_min_pass_interval_apart(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink, spacing: float) -> None:
    """20 writes a second for 2 s: with a spacing every write may get its pass; with 0.5 s the
    passes start at least that far apart and every line is still read."""
    (tmp_path / "logs").mkdir()
    component = tail_component(tmp_path, metrics, sink, "logs/*.log",
                               min_pass_interval_s=spacing)
    starts = counting_passes(component)
    async with running(component):
        await asyncio.sleep(0.2)
        del starts[:]
        for i in range(40):
            append(tmp_path / "logs" / "app.log", [f"line {i}"])
            await asyncio.sleep(0.05)
        await async_wait_for(lambda: len(sink.texts()) == 40, timeout=5.0)
    gaps = [b - a for a, b in pairwise(starts)]
    if spacing:
        assert len(starts) <= 2.0 / spacing + 3
        assert min(gaps) >= spacing * 0.95
    else:
        assert len(starts) >= 15   # a pass per write or so, on a loaded machine fewer


async def test_spacing_never_delays_the_first_change_after_quiet_nor_a_backlog(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "logs").mkdir()
    config = LogsConfig(paths=[str(tmp_path / "logs" / "*.log")],
                        checkpoint_path=str(tmp_path / "state" / "offsets.json"),
                        poll_interval_s=30.0, min_pass_interval_s=30.0, read_chunk_bytes=4096)
    log = tmp_path / "logs" / "app.log"
    async with running(LogTailComponent(config, metrics, sink)):
        await asyncio.sleep(0.2)                    # an idle pass
        append(log, ["after quiet"])
        await async_wait_for(lambda: len(sink.texts()) == 1, timeout=5.0)
        append(log, ["trickle"])                    # the pass before read a little: spaced
        await asyncio.sleep(1.0)
        assert len(sink.texts()) == 1
    big = [f"backlog {i:04d} " + "x" * 100 for i in range(200)]   # ~23 KB: several chunks
    append(log, big)
    async with running(LogTailComponent(config, metrics, sink)):
        await async_wait_for(lambda: len(sink.texts()) == 202, timeout=5.0)
        append(log, ["right behind the backlog"])   # the pass before read whole chunks
        await async_wait_for(lambda: len(sink.texts()) == 203, timeout=5.0)


async def test_stop_is_prompt_while_passes_are_spaced(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "logs").mkdir()
    component = tail_component(tmp_path, metrics, sink, "logs/*.log", min_pass_interval_s=30.0)
    starts = counting_passes(component)
    async with running(component):
        await asyncio.sleep(0.2)
        append(tmp_path / "logs" / "app.log", ["read at once after quiet"])
        await async_wait_for(lambda: len(sink.texts()) == 1, timeout=5.0)
        passes = len(starts)
        append(tmp_path / "logs" / "app.log", ["wakes it into the 30 s spacing"])
        await asyncio.sleep(0.5)
        assert len(starts) == passes
        started = time.monotonic()
    assert time.monotonic() - started < 5.0


async def test_stop_is_prompt_with_a_long_poll_interval(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "logs").mkdir()
    component = tail_component(tmp_path, metrics, sink, "logs/*.log")
    await component.start()
    await asyncio.sleep(0.2)  # the reader is waiting
    started = time.monotonic()
    await component.stop()
    assert time.monotonic() - started < 5.0


async def test_a_log_dir_created_after_start_is_watched_from_the_next_pass(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "other").mkdir()
    component = tail_component(tmp_path, metrics, sink, "other/*.log", "logs/*.log")
    async with running(component):
        await asyncio.sleep(0.1)
        (tmp_path / "logs").mkdir()
        append(tmp_path / "logs" / "app.log", ["first"])
        append(tmp_path / "other" / "app.log", ["wakes a pass"])
        await async_wait_for(lambda: "first" in sink.texts(), timeout=5.0)
        append(tmp_path / "logs" / "app.log", ["second"])  # wakes it now: watched
        await async_wait_for(lambda: "second" in sink.texts(), timeout=5.0)

        # Deleted and created again: watched again from the next pass.
        shutil.rmtree(tmp_path / "logs")
        (tmp_path / "logs").mkdir()
        append(tmp_path / "other" / "app.log", ["wakes a pass"])
        await async_wait_for(lambda: sink.texts().count("wakes a pass") == 2, timeout=5.0)
        append(tmp_path / "logs" / "app.log", ["third"])
        await async_wait_for(lambda: "third" in sink.texts(), timeout=5.0)


async def test_a_recursive_glob_watches_subdirectories_created_later(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    (tmp_path / "logs" / "pod-a").mkdir(parents=True)
    component = tail_component(tmp_path, metrics, sink, "logs/**/*.log")
    async with running(component):
        await asyncio.sleep(0.1)
        append(tmp_path / "logs" / "pod-a" / "app.log", ["a"])
        await async_wait_for(lambda: sink.texts() == ["a"], timeout=5.0)
        (tmp_path / "logs" / "pod-b" / "c1").mkdir(parents=True)
        await asyncio.sleep(0.3)  # the pass this wakes is over: only a watch on c1 sees "b"
        append(tmp_path / "logs" / "pod-b" / "c1" / "app.log", ["b"])
        await async_wait_for(lambda: sink.texts() == ["a", "b"], timeout=5.0)


@pytest.mark.parametrize("limit", ["instances", "watches"])
async def test_without_inotify_the_logs_are_polled_with_a_warning(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink, limit: str,
        inotify_limits: InotifyLimits, caplog: pytest.LogCaptureFixture) -> None:
    setattr(inotify_limits, limit, True)
    (tmp_path / "logs").mkdir()
    component = tail_component(tmp_path, metrics, sink, "logs/*.log", poll_interval_s=0.2)
    with caplog.at_level(logging.WARNING, logger="exporter.logs"):
        async with running(component):
            for i in range(3):
                append(tmp_path / "logs" / "app.log", [f"polled {i}"])
                await async_wait_for(lambda i=i: len(sink.texts()) == i + 1, timeout=5.0)
    code = errno.EMFILE if limit == "instances" else errno.ENOSPC
    warnings = [r.getMessage() for r in caplog.records if "cannot watch" in r.getMessage()]
    assert warnings == [f"cannot watch {tmp_path / 'logs'} for changes "
                        f"({OSError(code, os.strerror(code))}); polling it every 0.2s"]


async def test_start_and_stop_leave_no_descriptor_open(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc")
    (tmp_path / "logs" / "sub").mkdir(parents=True)
    before = len(list(fds.iterdir()))
    for run in range(3):
        component = tail_component(tmp_path, metrics, sink, "logs/**/*.log")
        await component.start()
        append(tmp_path / "logs" / "sub" / "app.log", numbered("run", run, 1))
        await async_wait_for(lambda run=run: sink.texts() == numbered("run", 0, run + 1),
                             timeout=5.0)
        await component.stop()
    assert len(list(fds.iterdir())) == before


async def test_a_log_dir_created_after_start_is_found_by_the_poll(
        tmp_path: Path, metrics: SidecarMetrics, sink: RecordingSink) -> None:
    component = tail_component(tmp_path, metrics, sink, "logs/*.log", poll_interval_s=0.1)
    async with running(component):
        (tmp_path / "logs").mkdir()
        append(tmp_path / "logs" / "app.log", ["first"])
        await async_wait_for(lambda: sink.texts() == ["first"], timeout=2.0)
        append(tmp_path / "logs" / "app.log", ["second"])  # now also watched
        await async_wait_for(lambda: len(sink.texts()) == 2, timeout=2.0)
