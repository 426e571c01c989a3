"""Reads log files as they grow, through rotations, and hands complete lines to the pipeline.

The :class:`Tailer` is synchronous and single-threaded: :meth:`Tailer.poll` does one pass
(find the files, follow renames and truncations, read what is new), so tests drive it pass by
pass; :mod:`exporter.logs.component` runs passes on a worker thread woken by inotify.

What a pass guarantees:

* **Whole lines, in batches.** Reads are ``read_chunk_bytes`` at a time; every complete line
  of a chunk goes to ``sink.process`` in one call, so per-line cost stays in the pipeline's
  tight loop. A partial last line waits (in memory) for its newline. Bytes pass through as
  they are: CRLF, invalid UTF-8.
* **Exact counting.** ``sink.process`` and the advance of the file's committed offset happen
  together under ``metrics.updating()``; so does :meth:`snapshot`, which the checkpoint
  uses. Counters and offsets therefore always describe the same set of lines.
* **Too-long lines** (over ``max_line_bytes``, line ending excluded) are counted as
  ``tts_exporter_log_lines_total{outcome="too_long"}`` and skipped, also when they span reads.
* **Identity.** A file is the same file while its ``(st_dev, st_ino)`` is and its first bytes
  (up to 256, hashed in checkpoints) still start the same way. Files are kept open, so an inode
  cannot be recycled under a file being followed; the head catches recycling across restarts
  and content replaced in place. Files no longer followed (finished, or in the checkpoint but
  not found yet) are remembered with their offsets, the last ``KNOWN_FILES`` of them: one that
  comes back (renamed back into the globs, a directory readable again) continues there.
* **Copies.** A new file whose head is the head of content already read (at least one whole
  line, or 256 bytes) is a copy of it, as Vector's checksum fingerprint decides: while the
  original still holds that content the copy is not read at all; once the original was
  truncated or is gone, the copy continues from the offset the original had reached.
* **Rotation.** *rename* (and *delete + recreate*): the old file is read to its end through
  the descriptor still open, before the new file at the path, which starts at 0. A rotated file
  that still matches the globs keeps its offset under its new name. *copytruncate* / plain
  truncation (size below the offset, or the first bytes changed): counted, re-read from 0; the
  copy of the old content (beside it, or found later through the globs) is read from the old
  offset first. ``.gz`` files are never read live.
* **Permissions are not rotations.** A followed file the globs stop returning is gone only when
  its path no longer names it; a directory that cannot be listed, or a path that cannot be
  stat'ed, leaves it followed (its descriptor still reads). Such errors are counted in
  ``tts_exporter_collector_errors_total{collector="tail"}`` on every pass and logged once
  per episode, at start-up too.
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
# Most bytes handed to the pipeline under one hold of the metrics lock: few enough that a scrape
# or the gate never waits long behind a backlog, enough that the lock is not the cost
# (docs/benchmarks.md, "Comment figures").
LOCK_BATCH_BYTES = 256 * 1024
# Files no longer followed whose identity and offset are kept (and checkpointed), so that one
# coming back or a copy of one turning up continues where reading stopped.
KNOWN_FILES = 256
Key = tuple[int, int]


class ChunkSink(Protocol):
    """What counts whole lines: :class:`exporter.logs.pipeline.LogPipeline` and the gateway's;
    they keep nothing per source."""

    def process(self, source: str, data: bytes) -> None: ...


class LineSink(ChunkSink, Protocol):
    """What the tailer feeds: :class:`exporter.logs.gateway.SourceRouter`, or a test double;
    ``forget`` drops what it keeps for a file the tailer let go."""

    def forget(self, source: str) -> None: ...


def fingerprint(head: bytes) -> str:
    return hashlib.blake2b(head, digest_size=16).hexdigest()


def watch_root(pattern: str) -> tuple[str, bool]:
    """The directory to watch for a glob, and whether it must be watched recursively (a
    wildcard in a directory part, e.g. ``logs/*/app.log``)."""
    parts = os.path.normpath(os.path.abspath(pattern)).split(os.sep)
    for index, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return os.sep.join(parts[:index]) or os.sep, index < len(parts) - 1
    return os.path.dirname(os.sep.join(parts)) or os.sep, False


def identifying(head: bytes) -> bool:
    """Whether a head is enough to recognise content by: a whole line, or the full 256 bytes
    (an empty or half-written first line says nothing)."""
    return len(head) >= FINGERPRINT_BYTES or b"\n" in head


def identity(head: bytes) -> bytes:
    """The part of a head a checkpoint identifies content by: its first line, up to 256 bytes
    (as Vector's first-line checksum does), so a copy cut short after it is still known."""
    return head[:head.find(b"\n") + 1 or FINGERPRINT_BYTES]


def same_start(head: bytes, other: bytes) -> bool:
    """Whether two heads show the same content, compared as far as both go."""
    common = min(len(head), len(other), FINGERPRINT_BYTES)
    return identifying(head[:common]) and head[:common] == other[:common]


@dataclass(frozen=True)
class Known:
    """A file not followed now, where reading it stopped, and its first bytes when they are
    at hand (a checkpoint keeps only their hash)."""

    entry: FileOffset
    head: bytes | None = None

    def starts(self, head: bytes, whole_line: bool = True) -> bool:
        """Whether ``head`` starts like this file's content; with ``whole_line``, over at
        least a whole line (what it takes to call another file a copy)."""
        if self.head is not None:
            part = head[:len(self.head)]
            same = part == self.head[:len(part)]
        else:
            part = head[:self.entry.fingerprint_len]
            same = len(part) == self.entry.fingerprint_len \
                and fingerprint(part) == self.entry.fingerprint
        return same and (identifying(part) or not whole_line)


@dataclass(eq=False)
class _File:
    """One followed file. ``offset``: everything before it is counted (what checkpoints hold).
    ``read_pos``: how far the file has been read; between the two lies either ``pending`` (a
    partial line) or, while ``skipping``, the start of a too-long line being thrown away."""

    path: str
    fd: int
    key: Key
    head: bytes  # the first bytes, up to FINGERPRINT_BYTES
    offset: int = 0
    read_pos: int = 0
    pending: bytes = b""
    skipping: bool = False
    away: bool = False  # no longer reachable through the globs: finish it, then close

    def seek(self, offset: int) -> None:
        self.offset = self.read_pos = offset
        self.pending, self.skipping = b"", False

    def entry(self) -> FileOffset:
        first = identity(self.head)
        return FileOffset(self.path, self.key[0], self.key[1], fingerprint(first), len(first),
                          self.offset)


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
        # Files not followed now (the checkpoint's, finished ones, the old content of a
        # truncated one), oldest first: a file of the same identity, or a copy, resumes there.
        self._known: list[Known] = []
        self._failing: set[str] = set()
        self._unlisted: set[str] = set()  # glob roots that could not be listed this pass
        self._lag_sources: set[str] = set()
        self.generation = 0  # bumped on every change a checkpoint should capture
        self.interrupted = False  # set from another thread to end a long pass early

    # --- restart ---------------------------------------------------------------------------

    def resume(self, offsets: Iterable[FileOffset]) -> None:
        """Offsets from a checkpoint, applied to files of the same identity when next found."""
        self._known = [Known(entry) for entry in offsets]

    def snapshot(self) -> list[FileOffset]:
        """The followed files and the remembered ones; call with ``metrics.updating()``
        held."""
        return [f.entry() for f in self.files.values()] + [k.entry for k in self._known]

    # --- one pass --------------------------------------------------------------------------

    def poll(self) -> int:
        """Find files, follow rotations, read everything new, refresh the lag gauge; the
        number of bytes read."""
        found, unsure = self._expand()
        self._follow(found, unsure)
        for f in list(self.files.values()):
            if not f.away:
                self._check_truncation(f, found)
        new = [path for path, st in found.items() if (st.st_dev, st.st_ino) not in self.files]
        # Files met before first, so a copy is compared with its original, not the reverse.
        new.sort(key=lambda path: not self._known_key(found[path]))
        for path in new:
            self._add(path, found)
        total = 0
        for f in list(self.files.values()):
            got = self._drain(f)
            total += got
            if self.interrupted:
                return total
            if f.away and got == 0:
                self._close(f)
        self._update_lag()
        return total

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()

    def _expand(self) -> tuple[dict[str, os.stat_result], set[str]]:
        """The regular files the globs match now, and the matched paths that failed stat."""
        found: dict[str, os.stat_result] = {}
        unsure: set[str] = set()
        seen: set[Key] = set()
        self._unlisted = {root for root in {watch_root(p)[0] for p in self.patterns}
                          if not self._listable(root)}
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
                    unsure.add(path)
                    continue
                key = (st.st_dev, st.st_ino)
                if stat.S_ISREG(st.st_mode) and key not in seen:
                    seen.add(key)
                    found[path] = st
        return found, unsure

    def _listable(self, directory: str) -> bool:
        """Whether a glob root can be listed (glob hides the error and matches nothing); one
        that does not exist (yet) is no error."""
        try:
            with os.scandir(directory):
                pass
        except FileNotFoundError:
            return True
        except OSError as exc:
            self._failed(directory, "cannot list the log directory", exc)
            return False
        self._recovered(directory)
        return True

    def _follow(self, found: dict[str, os.stat_result], unsure: set[str]) -> None:
        """Match followed files to their current names; mark the ones no glob reaches."""
        where = {(st.st_dev, st.st_ino): path for path, st in found.items()}
        for f in self.files.values():
            path = where.get(f.key)
            if path is None:
                if not f.away and not self._still_there(f, unsure):
                    f.away = True
                    self._left[f.path] = "rename" if _links(f.fd) else "recreate"
            elif path != f.path:
                if not f.away:
                    self._left[f.path] = "rename"
                f.path, f.away = path, False
        for f in self.files.values():  # a name taken over by a file we know is no rotation
            if not f.away:
                self._left.pop(f.path, None)

    def _still_there(self, f: _File, unsure: set[str]) -> bool:
        """Whether a followed file the globs did not return still has its path: a directory
        or file that cannot be read right now hides it without moving it."""
        where = os.path.abspath(f.path)
        if f.path in unsure or any(where.startswith(os.path.join(root, ""))
                                   for root in self._unlisted):
            return True
        try:
            st = os.stat(f.path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            self._failed(f.path, "cannot stat", exc)
            return True
        return (st.st_dev, st.st_ino) == f.key

    def _check_truncation(self, f: _File, found: dict[str, os.stat_result]) -> None:
        """Truncated (copytruncate, ``> file``) or rewritten in place: start over at 0."""
        try:
            size = os.fstat(f.fd).st_size
            head = os.pread(f.fd, FINGERPRINT_BYTES, 0)
        except OSError as exc:
            self._failed(f.path, "cannot read", exc)
            return
        if size >= f.read_pos and head.startswith(f.head):
            f.head = head
            return
        log.info("%s was truncated or rewritten in place; reading it again from the start",
                 f.path)
        former = Known(f.entry(), f.head)
        with self.metrics.updating():
            self.metrics.log_rotations.inc(("truncate",))
            self.sink.forget(f.path)
            f.head = head
            f.seek(0)
            self.generation += 1
        self._finish_copy(former, found)

    def _finish_copy(self, former: Known, found: dict[str, os.stat_result]) -> None:
        """copytruncate leaves a copy of the old content beside the file: if one is there,
        follow it from the old offset so the lines written since our last read are not lost.
        Otherwise remember the old content, for a copy that turns up later."""
        directory = os.path.dirname(former.entry.path) or "."
        best: tuple[float, str, int, os.stat_result, bytes] | None = None
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".gz") or not entry.is_file():
                    continue
                st = entry.stat()
                if (st.st_dev, st.st_ino) in self.files \
                        or (best is not None and best[0] >= st.st_mtime):
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY)
                    head = os.pread(fd, FINGERPRINT_BYTES, 0)
                except OSError:
                    continue
                if not former.starts(head) or self._same_known(st, head):
                    os.close(fd)
                    continue
                if best is not None:
                    os.close(best[2])
                best = (st.st_mtime, entry.path, fd, st, head)
        if best is None:
            if former not in self._known:
                self._remember(former)
            return
        if former in self._known:
            self._forget(former)
        _, path, fd, st, head = best
        copy = _File(path, fd, (st.st_dev, st.st_ino), head, away=path not in found)
        copy.seek(min(former.entry.offset, st.st_size))
        with self.metrics.updating():
            # The copy holds the older lines: read it before anything else.
            self.files = {copy.key: copy, **self.files}
            self.generation += 1
        log.info("%s: reading the rest of its rotated copy %s from offset %d",
                 former.entry.path, path, copy.offset)

    def _add(self, path: str, found: dict[str, os.stat_result]) -> None:
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
        same = self._same_known(st, head)
        if key in self.files or not identifying(head) or (same is None and self._mirrors(head)):
            # replaced between stat and open by a file we follow; without a whole first line
            # (nothing to read yet, nor to tell a copy by); or a copy of a followed file,
            # whose lines are read through the original
            os.close(fd)
            return
        self._recovered(path)
        f = _File(path, fd, key, head)
        kind = self._left.pop(path, None)
        mine = [k for k in self._known if k.entry.key == key and k is not same]
        copied = next((k for k in reversed(self._known)
                       if k.entry.key != key and k.starts(head)), None)
        if same is not None:  # the file we knew, back under the globs: not a rotation
            self._forget(same)
            f.seek(same.entry.offset)
            kind = None
        elif copied is not None:  # its lines up to there were read from the original
            self._forget(copied)
            f.seek(min(copied.entry.offset, st.st_size))
            kind = None
            log.info("%s is a copy of %s: reading it from offset %d", path, copied.entry.path,
                     f.offset)
        elif mine and not kind:  # shrunk: truncated; else other first bytes: a new file
            kind = "truncate" if st.st_size < mine[0].entry.offset else "recreate"
            log.info("%s changed while it was not followed (%s); reading it from the start",
                     path, kind)
        with self.metrics.updating():
            if kind:
                self.metrics.log_rotations.inc((kind,))
            self.files[key] = f
            self.generation += 1
        for entry in mine:  # the old content of this inode may have a copy beside it
            self._finish_copy(entry, found)

    def _mirrors(self, head: bytes) -> bool:
        """Whether ``head`` starts like a followed file still holding its content."""
        for f in self.files.values():
            try:
                live = os.pread(f.fd, FINGERPRINT_BYTES, 0)
            except OSError:
                continue
            if same_start(head, live):
                return True
        return False

    def _same_known(self, st: os.stat_result, head: bytes) -> Known | None:
        """What is remembered of this very file: same inode, same first bytes, not shorter
        than where reading stopped."""
        return next((k for k in self._known if k.entry.key == (st.st_dev, st.st_ino)
                     and st.st_size >= k.entry.offset and k.starts(head, whole_line=False)),
                    None)

    def _known_key(self, st: os.stat_result) -> bool:
        return any(k.entry.key == (st.st_dev, st.st_ino) for k in self._known)

    def _remember(self, known: Known) -> None:
        with self.metrics.updating():
            self._known = [*self._known, known][-KNOWN_FILES:]
            self.generation += 1

    def _forget(self, known: Known) -> None:
        with self.metrics.updating():
            self._known = [k for k in self._known if k is not known]
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
        with m.updating():
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
        with self.metrics.updating():
            del self.files[f.key]
            if all(other.path != f.path for other in self.files.values()):
                self.sink.forget(f.path)
            self.generation += 1
        self._remember(Known(f.entry(), f.head))

    def _update_lag(self) -> None:
        lag: dict[str, int] = {}
        for f in self.files.values():
            try:
                size = os.fstat(f.fd).st_size
            except OSError:
                continue
            lag[f.path] = lag.get(f.path, 0) + max(0, size - f.offset)
        with self.metrics.updating():
            for source in self._lag_sources - lag.keys():
                self.metrics.log_lag.remove((source,))
            for source, value in lag.items():
                self.metrics.log_lag.set((source,), float(value))
        self._lag_sources = set(lag)

    def _failed(self, path: str, what: str, exc: OSError) -> None:
        """An I/O error: counted every time, logged when a path starts failing."""
        if path not in self._failing:
            self._failing.add(path)
            log.error("log path %s: %s (%s); skipping it until it works", path, what,
                      exc.strerror or exc)
        self.metrics.count_error("tail")

    def _recovered(self, path: str) -> None:
        """The end of a failure episode: the next failure is logged again."""
        if path in self._failing:
            self._failing.discard(path)
            log.info("log path %s works again", path)


def _links(fd: int) -> int:
    try:
        return os.fstat(fd).st_nlink
    except OSError:
        return 0
