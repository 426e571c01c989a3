"""Read plain and gzip-rotated log files in time order, yielding parsed records.

Rotated files (``app.log.2.gz``, ``app.log.1``, ``app.log``) are ordered by their first
timestamp, so a request split across a rotation reads as one stream; files without any
timestamp keep their command-line order. Continuation lines (tracebacks) are attached to the
record they follow; malformed lines are counted, never fatal.

Damaged input is never fatal either: a file that cannot be opened (permissions, vanished), an
I/O error, or a gzip file cut short or corrupt ends that file where reading stopped. What came
before is used; the half line at the cut is not (it could parse to wrong values); the damage
is kept in :attr:`ReadStats.damaged` with its place, for the caller to warn about.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

from exporter.logs.parsers import MalformedLine, Record, RecordParser

_CHUNK = 1 << 20
_PROBE_LINES = 2000
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_INPUT = 1 << 16          # compressed bytes read at a time
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib parses the gzip header and checks its CRC and length


@dataclass(frozen=True)
class Damage:
    """Where reading a file stopped early, and why. ``offset``: the (uncompressed) text is
    whole up to this byte; ``line``: the complete lines before it, when the read started at
    the file's beginning."""

    file: str
    reason: str
    offset: int
    line: int | None

    def __str__(self) -> str:
        if self.offset == 0:
            return f"{self.file}: {self.reason}; nothing read from it"
        where = f"line {self.line:,}, byte {self.offset:,}" if self.line is not None \
            else f"byte {self.offset:,}"
        return f"{self.file}: {self.reason}; read up to {where} of its text"


@dataclass
class ReadStats:
    """Counts of what the reader saw, for the report's footer."""

    lines: int = 0
    records: int = 0
    continuation: int = 0
    malformed: int = 0
    bytes_read: int = 0
    files: list[str] = field(default_factory=list)
    damaged: list[Damage] = field(default_factory=list)

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


class GzipStream(io.RawIOBase):
    """The text of a gzip file (every member of it), decompressed as it is read. Where the
    compressed data ends early or stops making sense, the text ends there and :attr:`damage`
    says why: an exception would lose the data decompressed in the same read."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
        self._input = b""
        self._read = 0          # compressed bytes read from the file
        self.damage: str | None = None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()

    def _fill(self) -> bool:
        """More compressed input; False at the end of the file (or a read error)."""
        try:
            data = self._raw.read(_GZIP_INPUT)
        except OSError as exc:
            self.damage = f"cannot be read at compressed byte {self._read:,} " \
                          f"({exc.strerror or exc})"
            return False
        self._read += len(data)
        self._input += data
        return bool(data)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while self.damage is None:
            if self._inflate.eof:   # a member ended; another may follow (after zero padding)
                self._input = (self._inflate.unused_data + self._input).lstrip(b"\0")
                while not self._input:
                    if not self._fill():
                        return 0
                    self._input = self._input.lstrip(b"\0")
                self._inflate = zlib.decompressobj(_GZIP_WBITS)
            if not self._input and not self._fill():
                self.damage = self.damage or (
                    f"cut short: its {self._read:,} compressed bytes end inside the gzip "
                    "stream")
                return 0
            data, self._input = self._input, b""
            try:
                out = self._inflate.decompress(data, len(view))
            except zlib.error as exc:
                self.damage = f"corrupt near compressed byte {self._read - len(data):,} ({exc})"
                return 0
            self._input = self._inflate.unconsumed_tail
            if out:
                view[:len(out)] = out
                return len(out)
        return 0


def open_log(path: Path) -> BinaryIO:
    """Open a log as bytes, transparently decompressing gzip (detected by magic, not name)."""
    fh = open(path, "rb")  # noqa: SIM115 - the caller closes what is returned
    try:
        magic = fh.read(2)
        fh.seek(0)
    except OSError:
        fh.close()
        raise
    if magic == _GZIP_MAGIC:
        return io.BufferedReader(GzipStream(fh), _GZIP_INPUT)
    return fh


def damage_of(fh: BinaryIO) -> str | None:
    """Why the text of ``fh`` ended early, if it did (gzip streams only)."""
    raw = getattr(fh, "raw", None)
    return raw.damage if isinstance(raw, GzipStream) else None


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
    """The first parseable timestamp in the file's first lines (None when there is none, or
    the file cannot be read: reading it reports that)."""
    try:
        with open_log(path) as fh:
            return first_stamp(islice(fh, _PROBE_LINES), parser)
    except OSError:
        return None


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
    if rest and damage_of(fh) is None:     # a half line at a cut is no line
        yield rest if rest.endswith(b"\n") else rest + b"\n"


def read_chunks(path: Path, span: tuple[int, int | None], stats: ReadStats,
                size: int = _CHUNK) -> Iterator[bytes]:
    """Blocks of whole lines (see :func:`iter_chunks`) of the lines that start in ``span``
    (start, length: None to the end) of one file. Damage ends the range where it is, into
    ``stats.damaged``; it never raises."""
    stats.files.append(str(path))
    start, length = span
    whole, lines = start, 0
    try:
        with open_log(path) as fh:
            if start > 0:               # skip the line that started in the previous range
                fh.seek(start - 1)
                skipped = len(fh.readline())
                stats.bytes_read += skipped
                whole = start - 1 + skipped
                length = None if length is None else max(0, length - (whole - start))
            if length == 0:
                return
            for chunk in iter_chunks(fh, stats, length, size):
                whole += len(chunk)
                lines += chunk.count(b"\n")
                yield chunk
            reason = damage_of(fh)
    except OSError as exc:
        reason = f"cannot be read ({exc.strerror or exc})"
    if reason is not None:
        stats.damaged.append(Damage(str(path), reason, whole, lines if start == 0 else None))


def split_ranges(path: Path, piece: int) -> list[tuple[int, int | None]]:
    """Byte ranges of about ``piece`` bytes for a plain file (a gzip file, or one that
    cannot be read now, is one range)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) == _GZIP_MAGIC:
                return [(0, None)]
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return [(0, None)]
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
    pending: Record | None = None
    for chunk in read_chunks(path, span, stats, _CHUNK):   # _CHUNK read now: tests set it
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
