"""Cache-disk watcher: how full the filesystem under each cache dir is, and how much the dir
itself holds.

Filesystem size comes from ``statvfs`` on every poll (one syscall). The dir's bytes and file
count are kept *incrementally* from watchdog (inotify) events, because walking a cache of
hundreds of thousands of files every few seconds would cost more than the service it
watches; a full walk every ``reconcile_interval_s`` corrects whatever events were missed
(inotify queue overflow, files changed while the sidecar was down). Output per path::

    tts_cache_disk_total_bytes{path="cache/"} 5.0e11
    tts_cache_disk_free_bytes{path="cache/"} 4.1e10
    tts_cache_dir_bytes{path="cache/"} 3.2e10
    tts_cache_dir_files{path="cache/"} 18342

Used-space warnings (85/90/95 % by default) are logged once per upward crossing and re-armed
when usage falls back below the threshold.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from exporter.metrics import SidecarMetrics

log = logging.getLogger("exporter.disk")

# Re-arming a threshold only this far below it keeps usage that hovers on the line from
# logging a warning on every poll.
REARM_MARGIN = 0.01


class DirTally:
    """Bytes and number of regular files under one directory (symlinks are not followed).

    A map from file path to size: events update single entries, :meth:`rescan` replaces the
    whole map. Thread-safe, because watchdog delivers events on its own thread.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = os.path.abspath(root)
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def totals(self) -> tuple[int, int]:
        """``(bytes, files)`` now."""
        with self._lock:
            return self._bytes, len(self._sizes)

    def refresh(self, path: str) -> None:
        """Re-stat one path: count it if it is a regular file, forget it otherwise."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            self.forget(path)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        with self._lock:
            self._bytes += st.st_size - self._sizes.get(path, 0)
            self._sizes[path] = st.st_size

    def forget(self, path: str) -> None:
        """Drop a path and, if it was a directory, everything that was under it."""
        prefix = path.rstrip(os.sep) + os.sep
        with self._lock:
            if path in self._sizes:
                self._bytes -= self._sizes.pop(path)
            for gone in [p for p in self._sizes if p.startswith(prefix)]:
                self._bytes -= self._sizes.pop(gone)

    def add_tree(self, path: str) -> None:
        """Count everything under a directory that appeared (created or moved in)."""
        for file_path, size in _walk(path):
            with self._lock:
                self._bytes += size - self._sizes.get(file_path, 0)
                self._sizes[file_path] = size

    def rescan(self) -> tuple[int, int]:
        """Replace the map with a full walk (the reconcile); returns the *previous* totals, so
        the caller can tell how far the incremental count had drifted."""
        sizes = dict(_walk(self.root))
        with self._lock:
            previous = self._bytes, len(self._sizes)
            self._sizes, self._bytes = sizes, sum(sizes.values())
        return previous


def _walk(root: str) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            found.append((entry.path, entry.stat(follow_symlinks=False).st_size))
                    except OSError:  # removed while we looked
                        continue
        except OSError:
            continue
    return found


class _TallyHandler(FileSystemEventHandler):
    """Routes watchdog events to a :class:`DirTally`."""

    def __init__(self, tally: DirTally) -> None:
        self.tally = tally

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        src = os.fsdecode(event.src_path)
        if kind == "deleted":
            self.tally.forget(src)
        elif kind == "moved":
            self.tally.forget(src)
            self._appeared(os.fsdecode(event.dest_path), event.is_directory)
        elif kind == "created" or (kind in ("modified", "closed", "attrib")
                                   and not event.is_directory):
            self._appeared(src, event.is_directory)

    def _appeared(self, path: str, is_directory: bool) -> None:
        # A dir that appears may already hold files (moved in, or filled before its watch was
        # added), so it is walked rather than trusted to produce events for its contents.
        if not path.startswith(self.tally.root + os.sep):
            return
        if is_directory:
            self.tally.add_tree(path)
        else:
            self.tally.refresh(path)


class ThresholdAlarm:
    """Which used-space thresholds a new ratio crossed upwards, once per crossing."""

    def __init__(self, thresholds: Sequence[float], rearm_margin: float = REARM_MARGIN) -> None:
        self.thresholds = sorted(thresholds)
        self.rearm_margin = rearm_margin
        self.fired: set[float] = set()

    def update(self, used_ratio: float) -> tuple[list[float], list[float]]:
        """``(crossed, rearmed)``: thresholds newly reached, thresholds left well behind."""
        crossed = [t for t in self.thresholds if used_ratio >= t and t not in self.fired]
        rearmed = [t for t in self.thresholds
                   if t in self.fired and used_ratio < t - self.rearm_margin]
        self.fired = (self.fired | set(crossed)) - set(rearmed)
        return crossed, rearmed


class _Watched:
    """Everything kept per configured path."""

    def __init__(self, path: str, thresholds: Sequence[float]) -> None:
        self.path = path
        self.tally = DirTally(path)
        self.alarm = ThresholdAlarm(thresholds)
        self.scheduled = False
        self.failing = False


class DiskWatcher:
    """The disk component: a watchdog observer for the events, a poll loop for statvfs, the
    thresholds and the periodic reconcile. ``statvfs`` is injectable so tests can fill a disk.
    """

    routes: list[web.RouteDef]

    def __init__(
        self,
        paths: Sequence[str],
        metrics: SidecarMetrics,
        thresholds: Sequence[float] = (0.85, 0.90, 0.95),
        reconcile_interval_s: float = 60.0,
        poll_interval_s: float = 5.0,
        statvfs: Callable[[str], Any] = os.statvfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = []
        self.metrics = metrics
        self.watched = [_Watched(path, thresholds) for path in paths]
        self.reconcile_interval_s = reconcile_interval_s
        self.poll_interval_s = poll_interval_s
        self.statvfs = statvfs
        self.clock = clock
        self._observer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._next_reconcile = 0.0

    async def start(self) -> None:
        self.metrics.count_error("disk", 0.0)
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        await self.reconcile()
        self.poll_once()
        self._task = asyncio.create_task(self._run(), name="disk-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5.0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            if self.clock() >= self._next_reconcile:
                await self.reconcile()
            self.poll_once()

    async def reconcile(self) -> None:
        """(Re)attach watches that are missing and re-walk every dir, off the event loop.

        The watch is attached *before* the walk so that nothing created in between is missed:
        an event for a file the walk also found is harmless (entries are keyed by path).
        """
        self._next_reconcile = self.clock() + self.reconcile_interval_s
        for watched in self.watched:
            self._schedule(watched)
            before = await asyncio.to_thread(watched.tally.rescan)
            after = watched.tally.totals()
            if before != after and watched.scheduled:
                log.debug("%s: reconcile corrected %s bytes/files to %s", watched.path, before,
                          after)

    def _schedule(self, watched: _Watched) -> None:
        if watched.scheduled or self._observer is None:
            return
        try:
            self._observer.schedule(_TallyHandler(watched.tally), watched.tally.root,
                                    recursive=True)
        except OSError as exc:
            # Missing dir, or out of inotify watches: the reconcile still keeps the counts,
            # only less promptly; the next reconcile tries the watch again.
            log.warning("%s: cannot watch for changes (%s); counting by full scans every %ss",
                        watched.path, exc, self.reconcile_interval_s)
            return
        watched.scheduled = True

    def poll_once(self) -> None:
        """Publish filesystem and dir figures for every path; log threshold crossings."""
        m = self.metrics
        for watched in self.watched:
            key = (watched.path,)
            try:
                st = self.statvfs(watched.path)
            except OSError as exc:
                if not watched.failing:
                    log.error("%s: statvfs failed (%s); its cache-disk series are dropped until "
                              "it works again", watched.path, exc)
                watched.failing = True
                with m.updating():
                    m.collector_errors.inc(("disk",))
                    for family in (m.cache_disk_total, m.cache_disk_free, m.cache_dir_bytes,
                                   m.cache_dir_files):
                        family.remove(key)
                continue
            if watched.failing:
                log.info("%s: statvfs works again", watched.path)
                watched.failing = False
            total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
            dir_bytes, dir_files = watched.tally.totals()
            with m.updating():
                m.cache_disk_total.set(key, float(total))
                m.cache_disk_free.set(key, float(free))
                m.cache_dir_bytes.set(key, float(dir_bytes))
                m.cache_dir_files.set(key, float(dir_files))
            self._check_thresholds(watched, 1.0 - free / total if total else 0.0)

    def _check_thresholds(self, watched: _Watched, used_ratio: float) -> None:
        crossed, rearmed = watched.alarm.update(used_ratio)
        if crossed:
            log.warning("cache disk of %s is %.1f %% used: crossed the %.0f %% warning threshold",
                        watched.path, used_ratio * 100, max(crossed) * 100)
        if rearmed:
            log.info("cache disk of %s back to %.1f %% used: below %.0f %% again",
                     watched.path, used_ratio * 100, min(rearmed) * 100)
