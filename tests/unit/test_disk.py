"""Cache-disk watcher on real temp dirs with real watchdog (inotify) events; filesystem fill
levels through an injected ``statvfs``."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from exporter.metrics import SidecarMetrics
from exporter.system.disk import DirTally, DiskWatcher, ThresholdAlarm


class FakeDisk:
    """``statvfs`` of a 1000-block disk whose used share a test sets; or one that fails."""

    def __init__(self) -> None:
        self.used_ratio = 0.5
        self.error: OSError | None = None

    def __call__(self, path: str) -> Any:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(f_blocks=1000, f_frsize=4096,
                               f_bavail=round(1000 * (1 - self.used_ratio)))


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for watchdog's thread to deliver what ``check`` expects."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


@pytest.fixture
async def watcher(tmp_path: Path) -> AsyncIterator[tuple[DiskWatcher, Path, SidecarMetrics]]:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "old.wav").write_bytes(b"x" * 100)
    metrics = SidecarMetrics()
    # Long intervals: the test drives polls and reconciles itself.
    watcher = DiskWatcher([str(cache)], metrics, reconcile_interval_s=3600,
                          poll_interval_s=3600, statvfs=FakeDisk())
    await watcher.start()
    yield watcher, cache, metrics
    await watcher.stop()


def totals(watcher: DiskWatcher) -> tuple[int, int]:
    return watcher.watched[0].tally.totals()


async def test_start_counts_what_is_already_there_and_publishes(
        watcher: tuple[DiskWatcher, Path, SidecarMetrics]) -> None:
    w, cache, m = watcher
    key = (str(cache),)
    assert totals(w) == (100, 1)
    assert m.cache_dir_bytes.get(key) == 100
    assert m.cache_dir_files.get(key) == 1
    assert m.cache_disk_total.get(key) == 1000 * 4096
    assert m.cache_disk_free.get(key) == 500 * 4096


async def test_files_added_grown_renamed_and_removed_are_tracked_from_events(
        watcher: tuple[DiskWatcher, Path, SidecarMetrics]) -> None:
    w, cache, _ = watcher
    (cache / "a.wav").write_bytes(b"a" * 1000)
    await eventually(lambda: totals(w) == (1100, 2))
    with (cache / "a.wav").open("ab") as f:
        f.write(b"a" * 500)
    await eventually(lambda: totals(w) == (1600, 2))
    (cache / "a.wav").rename(cache / "b.wav")
    await eventually(lambda: totals(w) == (1600, 2))
    (cache / "old.wav").unlink()
    await eventually(lambda: totals(w) == (1500, 1))
    (cache / "b.wav").write_bytes(b"")  # truncated in place
    await eventually(lambda: totals(w) == (0, 1))


async def test_subdirectories_created_moved_in_and_removed(
        watcher: tuple[DiskWatcher, Path, SidecarMetrics], tmp_path: Path) -> None:
    w, cache, _ = watcher
    sub = cache / "voice" / "en"
    sub.mkdir(parents=True)
    (sub / "1.wav").write_bytes(b"1" * 10)
    (sub / "2.wav").write_bytes(b"2" * 20)
    await eventually(lambda: totals(w) == (130, 3))
    # A tree filled outside and moved in arrives as one event for the dir.
    outside = tmp_path / "staging"
    outside.mkdir()
    for i in range(5):
        (outside / f"{i}.wav").write_bytes(b"s" * 7)
    outside.rename(cache / "staged")
    await eventually(lambda: totals(w) == (165, 8))
    shutil.rmtree(cache / "voice")
    await eventually(lambda: totals(w) == (135, 6))
    # Moved out of the cache: gone from the count.
    (cache / "staged").rename(tmp_path / "elsewhere")
    await eventually(lambda: totals(w) == (100, 1))


async def test_symlinks_and_their_targets_are_not_counted(
        watcher: tuple[DiskWatcher, Path, SidecarMetrics], tmp_path: Path) -> None:
    w, cache, _ = watcher
    big = tmp_path / "big.bin"
    big.write_bytes(b"b" * 10_000)
    (cache / "link.bin").symlink_to(big)
    (cache / "marker").write_bytes(b"m")
    await eventually(lambda: totals(w) == (101, 2))
    await w.reconcile()
    assert totals(w) == (101, 2)


async def test_reconcile_corrects_drift(watcher: tuple[DiskWatcher, Path, SidecarMetrics],
                                       caplog: pytest.LogCaptureFixture) -> None:
    w, cache, m = watcher
    caplog.set_level(logging.DEBUG, logger="exporter.disk")
    tally = w.watched[0].tally
    # Missed events (an inotify overflow, say): the incremental count has drifted.
    tally.forget(str(cache / "old.wav"))
    tally.refresh(str(cache / "old.wav") + ".ghost")  # never existed: no effect
    assert totals(w) == (0, 0)
    await w.reconcile()
    assert totals(w) == (100, 1)
    w.poll_once()
    assert m.cache_dir_files.get((str(cache),)) == 1
    assert any("reconcile corrected (0, 0)" in r.getMessage() for r in caplog.records)


async def test_periodic_reconcile_runs_from_the_poll_loop(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "f").write_bytes(b"12345")  # before start: no event can undo the drift below
    now = [0.0]
    watcher = DiskWatcher([str(cache)], SidecarMetrics(), reconcile_interval_s=10,
                          poll_interval_s=0.01, statvfs=FakeDisk(), clock=lambda: now[0])
    await watcher.start()
    tally = watcher.watched[0].tally
    assert tally.totals() == (5, 1)
    tally.forget(str(cache / "f"))  # drift
    await asyncio.sleep(0.05)
    assert tally.totals() == (0, 0)  # not reconciled before its time
    now[0] = 10.0
    await eventually(lambda: tally.totals() == (5, 1))
    await watcher.stop()


async def test_missing_dir_is_watched_once_it_appears(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "later"
    watcher = DiskWatcher([str(cache)], SidecarMetrics(), reconcile_interval_s=3600,
                          poll_interval_s=3600, statvfs=FakeDisk())
    await watcher.start()
    assert totals(watcher) == (0, 0)
    assert any("cannot watch for changes" in r.getMessage() for r in caplog.records)
    cache.mkdir()
    (cache / "a").write_bytes(b"aa")
    await watcher.reconcile()
    assert totals(watcher) == (2, 1)
    (cache / "b").write_bytes(b"bbb")
    await eventually(lambda: totals(watcher) == (5, 2))  # events flow now
    await watcher.stop()


def test_dir_tally_without_events(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"xyz")
    (tmp_path / "y").write_bytes(b"y")
    tally = DirTally(tmp_path)
    assert tally.rescan() == (0, 0)  # the previous totals
    assert tally.totals() == (4, 2)
    tally.forget(str(tmp_path / "d"))  # a whole directory
    assert tally.totals() == (1, 1)
    tally.add_tree(str(tmp_path / "d"))
    assert tally.totals() == (4, 2)
    os.unlink(tmp_path / "y")
    tally.refresh(str(tmp_path / "y"))
    assert tally.totals() == (3, 1)


# --- Thresholds and statvfs ------------------------------------------------------------------


def test_threshold_alarm_fires_once_per_crossing_and_rearms_below_a_margin() -> None:
    alarm = ThresholdAlarm([0.95, 0.85, 0.90])
    assert alarm.update(0.5) == ([], [])
    assert alarm.update(0.86) == ([0.85], [])
    assert alarm.update(0.87) == ([], [])
    assert alarm.update(0.845) == ([], [])  # within the margin: still armed off
    assert alarm.update(0.96) == ([0.90, 0.95], [])
    assert alarm.update(0.80) == ([], [0.85, 0.90, 0.95])
    assert alarm.update(0.85) == ([0.85], [])


async def test_threshold_warnings_are_logged_once_per_crossing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = FakeDisk()
    watcher = DiskWatcher([str(tmp_path)], SidecarMetrics(), statvfs=disk)
    caplog.set_level(logging.INFO, logger="exporter.disk")
    for ratio in (0.5, 0.86, 0.87, 0.86, 0.91, 0.92, 0.96, 0.96, 0.70, 0.88):
        disk.used_ratio = ratio
        watcher.poll_once()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert "crossed the 85 % warning threshold" in warnings[0]
    assert "crossed the 90 %" in warnings[1]
    assert "crossed the 95 %" in warnings[2]
    assert "86.0 % used" in warnings[0]
    assert "crossed the 85 %" in warnings[3]  # re-armed by the drop to 70 %
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "below 85 % again" in infos[0]


async def test_statvfs_failure_drops_the_series_counts_and_logs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk, metrics = FakeDisk(), SidecarMetrics()
    watcher = DiskWatcher([str(tmp_path)], metrics, statvfs=disk)
    key = (str(tmp_path),)
    watcher.poll_once()
    assert metrics.cache_disk_free.get(key) is not None
    disk.error = OSError(5, "Input/output error")
    watcher.poll_once()
    watcher.poll_once()
    assert metrics.collector_errors.get(("disk",)) == 2
    for family in (metrics.cache_disk_total, metrics.cache_disk_free, metrics.cache_dir_bytes,
                   metrics.cache_dir_files):
        assert family.get(key) is None
    assert sum("statvfs failed" in r.getMessage() for r in caplog.records) == 1
    disk.error = None
    watcher.poll_once()
    assert metrics.cache_disk_total.get(key) == 1000 * 4096


async def test_real_statvfs_reports_this_filesystem(tmp_path: Path) -> None:
    metrics = SidecarMetrics()
    DiskWatcher([str(tmp_path)], metrics).poll_once()
    total = metrics.cache_disk_total.get((str(tmp_path),))
    free = metrics.cache_disk_free.get((str(tmp_path),))
    assert total is not None
    assert free is not None
    assert 0 <= free <= total
    assert total == shutil.disk_usage(tmp_path).total
