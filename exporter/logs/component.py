"""The tailer as a sidecar component: a worker thread woken by inotify, and the checkpoint.

Reading and parsing run on their own thread, never on the aiohttp event loop: a backlog of
hundreds of megabytes must not delay ``/metrics`` or ``/ingress``. The thread blocks on a
:class:`DirectoryWatch` (inotify, read by this thread itself) until a watched directory
changes, or ``logs.poll_interval_s`` passes (the safety net for missed events, NFS, and
directories that did not exist yet or cannot be watched), then runs one :meth:`Tailer.poll`
pass; while a writer trickles, passes start at least ``logs.min_pass_interval_s`` apart. The
only lock it shares with the event loop is ``metrics.updating()``, held per batch of
at most ``LOCK_BATCH_BYTES`` of lines.

The checkpoint is written at most every ``logs.checkpoint_interval_s`` (when something
changed) and at a clean stop, from a snapshot of offsets and counters taken under that lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

from aiohttp import web

from exporter.config import Config, LogsConfig
from exporter.logs.checkpoint import Checkpoint, CheckpointStore
from exporter.logs.gateway import log_sink
from exporter.logs.pipeline import RecordCallback
from exporter.logs.tailer import LineSink, Tailer, watch_root
from exporter.logs.watch import DirectoryWatch
from exporter.metrics import SidecarMetrics

log = logging.getLogger("exporter.logs")


class LogTailComponent:
    """Tails ``logs.paths`` and ``logs.sources`` into ``sink`` (normally the
    :class:`SourceRouter` of the app's and the gateway's pipelines)."""

    routes: list[web.RouteDef]

    def __init__(
        self,
        config: LogsConfig,
        metrics: SidecarMetrics,
        sink: LineSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = []
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.store = CheckpointStore(config.checkpoint_path)
        self.tailer = Tailer(config.tailed_paths(), metrics, sink, config.max_line_bytes,
                             config.read_chunk_bytes,
                             exclude=[str(self.store.path), str(self.store.temp_path)])
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: DirectoryWatch | None = None
        self._unwatched: set[str] = set()  # roots warned about, until they can be watched
        self._saved_generation = -1
        self._next_checkpoint = 0.0

    @classmethod
    def from_config(cls, config: Config, metrics: SidecarMetrics,
                    on_records: RecordCallback | None = None) -> LogTailComponent:
        """The sidecar's tailer, feeding the real pipelines (the app's and the gateway's, by
        file). Restarts are counted from ``service_start`` records only when no ``/status``
        probe counts them already."""
        sink = log_sink(metrics, config.logs, config.metrics, on_records=on_records,
                        count_restarts=not config.probe.url)
        return cls(config.logs, metrics, sink)

    # --- synchronous core (the worker thread; tests call it directly) -------------------

    def restore(self) -> None:
        """Load the checkpoint: counters into the registry, offsets into the tailer."""
        checkpoint = self.store.load(self.metrics.metric_set.check_state)
        if checkpoint is None:
            log.info("no usable log checkpoint at %s: reading log files from the start",
                     self.store.path)
            return
        with self.metrics.updating():
            dropped = self.metrics.metric_set.load_state(checkpoint.metrics)
        if dropped:
            log.warning("log checkpoint %s: could not restore %s (metric gone or buckets "
                        "changed); they restart from 0", self.store.path, ", ".join(dropped))
        self.tailer.resume(checkpoint.files)
        log.info("resuming %d log file(s) from checkpoint %s", len(checkpoint.files),
                 self.store.path)

    def step(self) -> int:
        """One read pass, then a checkpoint if one is due; the bytes read. Never raises."""
        read = 0
        try:
            read = self.tailer.poll()
        except Exception:
            log.exception("log tail pass failed; retrying at the next one")
            self.metrics.count_error("tail")
        if self.clock() >= self._next_checkpoint:
            self.checkpoint()
        return read

    def checkpoint(self) -> bool:
        """Write the checkpoint if anything changed since the last one; True when written."""
        with self.metrics.updating():
            if self.tailer.generation == self._saved_generation:
                return False
            generation = self.tailer.generation
            snapshot = Checkpoint(self.tailer.snapshot(), self.metrics.log_state())
        try:
            self.store.save(snapshot)
        except OSError as exc:
            log.error("cannot write log checkpoint %s (%s); will retry", self.store.path, exc)
            self.metrics.count_error("tail")
            self._next_checkpoint = self.clock() + self.config.checkpoint_interval_s
            return False
        self._saved_generation = generation
        self._next_checkpoint = self.clock() + self.config.checkpoint_interval_s
        return True

    def _run(self, watch: DirectoryWatch) -> None:
        spacing = self.config.min_pass_interval_s
        while not self._stopping.is_set():
            began = time.monotonic()
            self._watch_roots(watch)
            read = self.step()
            timeout = self.config.poll_interval_s
            if self.tailer.generation != self._saved_generation:
                timeout = min(timeout, max(0.0, self._next_checkpoint - self.clock()))
            watch.wait(timeout)
            # While a writer trickles, changes sooner than that are read together by the next
            # pass: a steady writer costs a few full passes a second, not one per write (each
            # pass pays its own fixed and cold-cache cost), at the price of that much more lag.
            # After an idle pass the first change is read at once; after a whole read chunk
            # the reader is behind a fast writer: no wait either.
            rest = spacing - (time.monotonic() - began)
            if rest > 0 and 0 < read < self.config.read_chunk_bytes:
                self._stopping.wait(rest)

    def _watch_roots(self, watch: DirectoryWatch) -> None:
        """(Re)try watches for the glob roots; a root not watched now (missing, deleted, or
        not watchable) is retried every pass, and warned about once until it is watched."""
        for pattern in self.config.tailed_paths():
            root, recursive = watch_root(pattern)
            if not os.path.isdir(root):
                continue
            try:
                watch.watch(root, recursive)
            except OSError as exc:
                if root not in self._unwatched:
                    log.warning("cannot watch %s for changes (%s); polling it every %ss", root,
                                exc, self.config.poll_interval_s)
                    self._unwatched.add(root)
                continue
            self._unwatched.discard(root)

    # --- Component ------------------------------------------------------------------------

    async def start(self) -> None:
        self.metrics.count_error("tail", 0.0)
        await asyncio.to_thread(self.restore)
        self._watch = DirectoryWatch()
        self._thread = threading.Thread(target=self._run, args=(self._watch,),
                                        name="log-tailer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self.tailer.interrupted = True  # a long backlog pass ends at its next chunk
        if self._watch is not None:
            self._watch.wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        await asyncio.to_thread(self.checkpoint)
        self.tailer.close()
