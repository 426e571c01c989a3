"""Read plain and gzip-rotated log files in time order, yielding parsed records.

Rotated files (``app.log.2.gz``, ``app.log.1``, ``app.log``) are ordered by their first
timestamp, so a request split across a rotation reads as one stream; files without any
timestamp keep their command-line order. Continuation lines (tracebacks) are attached to the
record they follow; malformed lines are counted, never fatal.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO

from exporter.logs.parsers import MalformedLine, Record, RecordParser

_CHUNK = 1 << 20
_PROBE_LINES = 2000


@dataclass
class ReadStats:
    """Counts of what the reader saw, for the report's footer."""

    lines: int = 0
    records: int = 0
    continuation: int = 0
    malformed: int = 0
    bytes_read: int = 0
    files: list[str] = field(default_factory=list)

    def count(self, kind: str) -> None:
        """One parsed line of ``kind`` ("record", "continuation", "malformed" or "blank"):
        blank lines are not lines."""
        if kind != "blank":
            self.lines += 1
            if kind == "record":
                self.records += 1
            elif kind == "malformed":
                self.malformed += 1
            else:
                self.continuation += 1


def open_log(path: Path) -> BinaryIO:
    """Open a log as bytes, transparently decompressing gzip (detected by magic, not name)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def first_stamp(lines: Iterable[bytes], parser: RecordParser) -> float | None:
    """The first parseable timestamp among ``lines`` (None when there is none)."""
    for line in lines:
        try:
            record = parser.parse(line)
        except MalformedLine:
            continue
        if record is not None and record.time is not None:
            return record.time
    return None


def first_time(path: Path, parser: RecordParser) -> float | None:
    """The first parseable timestamp in the file's first lines (None when there is none)."""
    with open_log(path) as fh:
        return first_stamp(islice(fh, _PROBE_LINES), parser)


def order_files(paths: list[Path], parser: RecordParser) -> list[Path]:
    """Order by first timestamp; files without one keep their position relative to others."""
    keyed = [(first_time(p, parser), i, p) for i, p in enumerate(paths)]
    timed = iter(sorted((k for k in keyed if k[0] is not None), key=lambda k: (k[0], k[1])))
    return [p if t is None else next(timed)[2] for t, _, p in keyed]


def iter_chunks(fh: BinaryIO, stats: ReadStats, limit: int | None = None,
                size: int = _CHUNK) -> Iterator[bytes]:
    """Blocks of whole lines, each ending in ``\n`` (large reads are far faster than per-line
    reads on gzip streams). With ``limit``, only lines that start within the next ``limit``
    bytes (the last one is completed past the limit), so byte ranges of one file can be read
    by different workers."""
    rest = b""
    left = -1 if limit is None else limit
    while left:
        chunk = fh.read(size if left < 0 else min(size, left))
        if not chunk:
            break
        left -= len(chunk) if left > 0 else 0
        stats.bytes_read += len(chunk)
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            rest += chunk
            continue
        yield rest + chunk[:cut] if rest else chunk[:cut]
        rest = chunk[cut:]
    if rest and limit is not None and left == 0:
        tail = fh.readline()
        stats.bytes_read += len(tail)
        rest += tail
    if rest:
        yield rest if rest.endswith(b"\n") else rest + b"\n"


@contextmanager
def open_range(path: Path, span: tuple[int, int | None], stats: ReadStats
               ) -> Iterator[tuple[BinaryIO, int | None]]:
    """The file positioned at the first line that starts in ``span`` (start, length), and the
    length left to read (None: to the end)."""
    stats.files.append(str(path))
    start, length = span
    with open_log(path) as fh:
        if start > 0:               # skip the line that started in the previous range
            fh.seek(start - 1)
            stats.bytes_read += len(fh.readline())
            length = None if length is None else max(0, length - (fh.tell() - start))
        yield fh, length


def split_ranges(path: Path, piece: int) -> list[tuple[int, int | None]]:
    """Byte ranges of about ``piece`` bytes for a plain file (a gzip file is one range)."""
    with open(path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            return [(0, None)]
    size = path.stat().st_size
    starts = list(range(0, max(size, 1), piece))
    return [(a, min(a + piece, size) - a) for a in starts]


def iter_records(paths: list[Path], parser: RecordParser, stats: ReadStats,
                 keep_continuations: bool = False,
                 needle: bytes | None = None) -> Iterator[Record]:
    """Every record of every file, files ordered by first timestamp. With
    ``keep_continuations`` a traceback's lines are appended to the preceding record's
    ``fields["traceback"]`` (a list of str)."""
    for path in order_files(paths, parser):
        yield from file_records(path, parser, stats, keep_continuations, needle=needle)


def file_records(path: Path, parser: RecordParser, stats: ReadStats,
                 keep_continuations: bool = False,
                 span: tuple[int, int | None] = (0, None),
                 needle: bytes | None = None) -> Iterator[Record]:
    """The records of one file in file order (see :func:`iter_records`).
    ``span`` (start, length) of a plain file: only the lines that start in that range.
    ``needle`` (``--id``): lines without it are not parsed, only kept as continuations of a
    kept record when they cannot start one (``stats.lines`` still counts every line, records
    and the rest only what was parsed); a chunk without it is skipped whole (one C-speed
    search) unless a kept record may go on into it."""
    with open_range(path, span, stats) as (fh, length):
        if length == 0:
            return
        pending: Record | None = None
        for chunk in iter_chunks(fh, stats, length, _CHUNK):   # _CHUNK read now: tests set it
            if needle is not None and pending is None and needle not in chunk:
                stats.lines += chunk.count(b"\n")      # one C-speed search a chunk
                continue
            lines = chunk.split(b"\n")
            lines.pop()
            for line in lines:
                if needle is not None and needle not in line:
                    head = line[:1]
                    if pending is None or head == b"{" or head.isdigit() or not line.strip():
                        stats.lines += 1            # counted, not parsed
                        if pending is not None and line.strip():
                            yield pending
                            pending = None
                        continue
                try:
                    record = parser.parse(line)
                except MalformedLine:
                    stats.count("malformed")
                    continue
                if record is None:
                    blank = not line.strip()
                    stats.count("blank" if blank else "continuation")
                    if not blank and keep_continuations and pending is not None:
                        tb = pending.fields.setdefault("traceback", [])
                        assert isinstance(tb, list)
                        tb.append(line.rstrip(b"\r").decode("utf-8", "replace"))
                    continue
                stats.count("record")
                if pending is not None:
                    yield pending
                pending = record
        if pending is not None:
            yield pending
