"""Reads log files as they grow, through rotations, and hands complete lines to the pipeline.

The :class:`Tailer` is synchronous and single-threaded: :meth:`Tailer.poll` does one pass
(find the files, follow renames and truncations, read what is new), so tests drive it pass by
pass; :mod:`exporter.logs.component` runs passes on a worker thread woken by watchdog.

What a pass guarantees:

* **Whole lines, in batches.** Reads are ``read_chunk_bytes`` at a time; every complete line
  of a chunk goes to ``sink.process`` in one call, so per-line cost stays in the pipeline's
  tight loop. A partial last line waits (in memory) for its newline. Bytes pass through as
  they are: CRLF, invalid UTF-8.
* **Exact counting.** ``sink.process`` and the advance of the file's committed offset happen
  together under ``metrics.registry.lock``; so does :meth:`snapshot`, which the checkpoint
  uses. Counters and offsets therefore always describe the same set of lines.
* **Too-long lines** (over ``max_line_bytes``, line ending excluded) are counted as
  ``tts_exporter_log_lines_total{outcome="too_long"}`` and skipped, also when they span reads.
* **Identity.** A file is ``(st_dev, st_ino)`` plus a hash of its first 256 bytes. Files are
  kept open, so an inode cannot be recycled under a file being followed; the hash catches
  recycling across restarts and content replaced in place.
* **Rotation.** *rename* (and *delete + recreate*): the old file is read to its end through
  the descriptor still open, before the new file at the path, which starts at 0. A rotated file
  that still matches the globs keeps its offset under its new name. *copytruncate* / plain
  truncation (size below the offset, or the first bytes changed): counted, re-read from 0; if a
  copy of the old content sits next to it (same first bytes), its unread tail is read first.
  ``.gz`` files are never read live.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from exporter.logs.checkpoint import FileOffset
from exporter.metrics import SidecarMetrics

log = logging.getLogger("exporter.logs.tailer")

FINGERPRINT_BYTES = 256
# Most bytes handed to the pipeline under one hold of the metrics lock: at ~350k lines/s that
# is ~10 ms, so a scrape or the gate never waits long behind a backlog.
LOCK_BATCH_BYTES = 256 * 1024
Key = tuple[int, int]


class LineSink(Protocol):
    """What the tailer feeds: :class:`exporter.logs.pipeline.LogPipeline`, or a test double."""

    def process(self, source: str, data: bytes) -> None: ...

    def forget(self, source: str) -> None: ...


def fingerprint(head: bytes) -> str:
    return hashlib.blake2b(head, digest_size=16).hexdigest()


@dataclass(eq=False)
class _File:
    """One followed file. ``offset``: everything before it is counted (what checkpoints hold).
    ``read_pos``: how far the file has been read; between the two lies either ``pending`` (a
    partial line) or, while ``skipping``, the start of a too-long line being thrown away."""

    path: str
    fd: int
    key: Key
    fp: str
    fp_len: int
    offset: int = 0
    read_pos: int = 0
    pending: bytes = b""
    skipping: bool = False
    away: bool = False  # no longer reachable through the globs: finish it, then close

    def seek(self, offset: int) -> None:
        self.offset = self.read_pos = offset
        self.pending, self.skipping = b"", False

    def entry(self) -> FileOffset:
        return FileOffset(self.path, self.key[0], self.key[1], self.fp, self.fp_len, self.offset)


def drop_long_lines(complete: bytes, max_line: int) -> tuple[bytes, int]:
    """``complete`` (whole lines) without lines longer than ``max_line``, and how many went.

    The check costs one ``rfind`` per ``max_line`` bytes rather than one step per line: any
    line that lies inside a window of ``max_line + 1`` bytes is short enough.
    """
    size, start = len(complete), 0
    while start < size:
        last = complete.rfind(b"\n", start, start + max_line + 1)
        if last < 0:
            break
        start = last + 1
    else:
        return complete, 0
    lines = complete.split(b"\n")[:-1]
    kept = [line for line in lines if len(line) <= max_line]
    return (b"\n".join(kept) + b"\n" if kept else b""), len(lines) - len(kept)


class Tailer:
    """Follows every regular file matching ``patterns`` (globs, ``**`` allowed)."""

    def __init__(
        self,
        patterns: Sequence[str],
        metrics: SidecarMetrics,
        sink: LineSink,
        max_line_bytes: int = 65536,
        read_chunk_bytes: int = 1 << 20,
        exclude: Iterable[str] = (),
    ) -> None:
        self.patterns = list(patterns)
        self.metrics = metrics
        self.sink = sink
        self.max_line = max_line_bytes
        self.chunk = read_chunk_bytes
        self.exclude = {os.path.abspath(p) for p in exclude}
        self.files: dict[Key, _File] = {}
        # Paths a followed file left (renamed or deleted), with the rotation kind to count
        # when a new file shows up there.
        self._left: dict[str, str] = {}
        self._resume: dict[Key, FileOffset] = {}
        self._failing: set[str] = set()
        self._lag_sources: set[str] = set()
        self.generation = 0  # bumped on every change a checkpoint should capture
        self.interrupted = False  # set from another thread to end a long pass early

    # --- restart ---------------------------------------------------------------------------

    def resume(self, offsets: Iterable[FileOffset]) -> None:
        """Offsets from a checkpoint, applied to files of the same identity when next found."""
        self._resume = {entry.key: entry for entry in offsets}

    def snapshot(self) -> list[FileOffset]:
        """The committed offsets; call with ``metrics.registry.lock`` held."""
        return [f.entry() for f in self.files.values()]

    # --- one pass --------------------------------------------------------------------------

    def poll(self) -> None:
        """Find files, follow rotations, read everything new, refresh the lag gauge."""
        found = self._expand()
        self._follow(found)
        for f in list(self.files.values()):
            if not f.away:
                self._check_truncation(f)
        for path, st in found.items():
            if (st.st_dev, st.st_ino) not in self.files:
                self._add(path)
        for f in list(self.files.values()):
            got = self._drain(f)
            if self.interrupted:
                return
            if f.away and got == 0:
                self._close(f)
        self._update_lag()

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()

    def _expand(self) -> dict[str, os.stat_result]:
        found: dict[str, os.stat_result] = {}
        seen: set[Key] = set()
        for pattern in self.patterns:
            for path in sorted(glob.glob(pattern, recursive=True)):
                if path.endswith(".gz") or os.path.abspath(path) in self.exclude:
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._failed(path, "cannot stat", exc)
                    continue
                key = (st.st_dev, st.st_ino)
                if stat.S_ISREG(st.st_mode) and key not in seen:
                    seen.add(key)
                    found[path] = st
        return found

    def _follow(self, found: dict[str, os.stat_result]) -> None:
        """Match followed files to their current names; mark the ones no glob reaches."""
        where = {(st.st_dev, st.st_ino): path for path, st in found.items()}
        for f in self.files.values():
            path = where.get(f.key)
            if path is None:
                if not f.away:
                    f.away = True
                    self._left[f.path] = "rename" if _links(f.fd) else "recreate"
            elif path != f.path:
                if not f.away:
                    self._left[f.path] = "rename"
                f.path, f.away = path, False
        for f in self.files.values():  # a name taken over by a file we know is no rotation
            if not f.away:
                self._left.pop(f.path, None)

    def _check_truncation(self, f: _File) -> None:
        """Truncated (copytruncate, ``> file``) or rewritten in place: start over at 0."""
        try:
            size = os.fstat(f.fd).st_size
            head = os.pread(f.fd, FINGERPRINT_BYTES, 0)
        except OSError as exc:
            self._failed(f.path, "cannot read", exc)
            return
        if size >= f.read_pos and fingerprint(head[: f.fp_len]) == f.fp:
            if len(head) > f.fp_len:
                f.fp, f.fp_len = fingerprint(head), len(head)
            return
        log.info("%s was truncated or rewritten in place; reading it again from the start",
                 f.path)
        self._finish_copy(f)
        with self.metrics.registry.lock:
            self.metrics.log_rotations.inc(("truncate",))
            self.sink.forget(f.path)
            f.fp, f.fp_len = fingerprint(head), len(head)
            f.seek(0)
            self.generation += 1

    def _finish_copy(self, f: _File) -> None:
        """copytruncate leaves a copy of the old content beside the file: if one is there,
        follow it from our offset so the lines written since our last read are not lost."""
        if f.fp_len == 0:
            return
        directory = os.path.dirname(f.path) or "."
        best: tuple[float, str, int, os.stat_result] | None = None
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".gz") or not entry.is_file():
                    continue
                st = entry.stat()
                if (st.st_dev, st.st_ino) in self.files or st.st_size < f.offset:
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY)
                except OSError:
                    continue
                if fingerprint(os.pread(fd, f.fp_len, 0)) != f.fp or (
                        best is not None and best[0] >= st.st_mtime):
                    os.close(fd)
                    continue
                if best is not None:
                    os.close(best[2])
                best = (st.st_mtime, entry.path, fd, st)
        if best is None:
            return
        _, path, fd, st = best
        copy = _File(path, fd, (st.st_dev, st.st_ino), f.fp, f.fp_len, away=True)
        copy.seek(f.offset)
        # The copy holds the older lines: read it before anything else.
        self.files = {copy.key: copy, **self.files}
        log.info("%s: reading the rest of its rotated copy %s from offset %d", f.path, path,
                 f.offset)

    def _add(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._failed(path, "cannot open", exc)
            return
        try:
            st = os.fstat(fd)
            head = os.pread(fd, FINGERPRINT_BYTES, 0)
        except OSError as exc:
            os.close(fd)
            self._failed(path, "cannot read", exc)
            return
        key = (st.st_dev, st.st_ino)
        if key in self.files:  # replaced between stat and open by a file we already follow
            os.close(fd)
            return
        self._failing.discard(path)
        f = _File(path, fd, key, fingerprint(head), len(head))
        kind = self._left.pop(path, None)
        saved = self._resume.pop(key, None)  # a checkpoint offset is used once
        if saved is not None:
            same = fingerprint(head[: saved.fingerprint_len]) == saved.fingerprint
            if same and st.st_size >= saved.offset:
                f.seek(saved.offset)
            else:  # shrunk: truncated; same size or more but other first bytes: a new file
                kind = "truncate" if st.st_size < saved.offset else "recreate"
                log.info("%s changed while the sidecar was down (%s); reading it from the start",
                         path, kind)
        with self.metrics.registry.lock:
            if kind:
                self.metrics.log_rotations.inc((kind,))
            self.files[key] = f
            self.generation += 1

    def _drain(self, f: _File) -> int:
        """Read ``f`` up to its current end; returns the number of bytes read."""
        total = 0
        while not self.interrupted:
            try:
                chunk = os.pread(f.fd, self.chunk, f.read_pos)
            except OSError as exc:
                self._failed(f.path, "cannot read", exc)
                return total
            if not chunk:
                return total
            f.read_pos += len(chunk)
            total += len(chunk)
            self._consume(f, chunk)
            if len(chunk) < self.chunk:
                return total
        return total

    def _consume(self, f: _File, chunk: bytes) -> None:
        too_long = 0
        if f.skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                return
            too_long, f.skipping = 1, False
            data = chunk[newline + 1:]
            base = f.read_pos - len(data)
        else:
            data = f.pending + chunk if f.pending else chunk
            base = f.offset
        end = data.rfind(b"\n") + 1
        complete, rest = data[:end], data[end:]
        if len(rest) > self.max_line:
            f.pending, f.skipping = b"", True
        else:
            f.pending = rest
        if len(complete) > self.max_line + 1:
            kept, dropped = drop_long_lines(complete, self.max_line)
            if dropped:
                self._commit(f, kept, base + end, too_long + dropped)
                return
        start = 0
        while len(complete) - start > LOCK_BATCH_BYTES:
            cut = complete.find(b"\n", start + LOCK_BATCH_BYTES) + 1 or len(complete)
            self._commit(f, complete[start:cut], base + cut, too_long)
            start, too_long = cut, 0
        self._commit(f, complete[start:] if start else complete, base + end, too_long)

    def _commit(self, f: _File, lines: bytes, new_offset: int, too_long: int) -> None:
        """Count and advance together: the one place offsets move forward."""
        if new_offset == f.offset and not too_long:
            return
        m = self.metrics
        with m.registry.lock:
            if lines:
                try:
                    self.sink.process(f.path, lines)
                except Exception:  # the pipeline promises not to raise; never stall on it
                    log.exception("log pipeline failed on %d bytes of %s", len(lines), f.path)
                    m.collector_errors.inc(("tail",))
            if too_long:
                m.log_lines.inc(("too_long",), too_long)
            m.log_bytes.inc((), new_offset - f.offset)
            f.offset = new_offset
            self.generation += 1

    def _close(self, f: _File) -> None:
        """Done with a rotated-away file: an unterminated last line counts as a line now."""
        if f.pending or f.skipping:
            line, f.pending = (f.pending + b"\n" if f.pending else b""), b""
            self._commit(f, line, f.read_pos, int(f.skipping))
        os.close(f.fd)
        with self.metrics.registry.lock:
            del self.files[f.key]
            if all(other.path != f.path for other in self.files.values()):
                self.sink.forget(f.path)
            self.generation += 1

    def _update_lag(self) -> None:
        lag: dict[str, int] = {}
        for f in self.files.values():
            try:
                size = os.fstat(f.fd).st_size
            except OSError:
                continue
            lag[f.path] = lag.get(f.path, 0) + max(0, size - f.offset)
        with self.metrics.registry.lock:
            for source in self._lag_sources - lag.keys():
                self.metrics.log_lag.remove((source,))
            for source, value in lag.items():
                self.metrics.log_lag.set((source,), float(value))
        self._lag_sources = set(lag)

    def _failed(self, path: str, what: str, exc: OSError) -> None:
        """An I/O error: counted every time, logged when a path starts failing."""
        if path not in self._failing:
            self._failing.add(path)
            log.error("log file %s: %s (%s); skipping it until it works", path, what,
                      exc.strerror or exc)
        with self.metrics.registry.lock:
            self.metrics.collector_errors.inc(("tail",))


def _links(fd: int) -> int:
    try:
        return os.fstat(fd).st_nlink
    except OSError:
        return 0
