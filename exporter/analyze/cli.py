"""``tts-exporter analyze``: summary report or one request's timeline over rotated logs."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from exporter.analyze.reader import (
    Damage,
    ReadStats,
    file_records,
    iter_records,
    order_files,
    read_chunks,
    split_ranges,
)
from exporter.analyze.render import dump_json, render_report, render_timeline
from exporter.analyze.report import GATEWAY_EVENT, Report
from exporter.analyze.scan import NATIVE, ChunkScanner, Window
from exporter.logs.parsers import Record, RecordParser
from exporter.logs.timelines import timeline_dict

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """ISO-8601 (naive = local), "YYYY-MM-DD HH:MM[:SS]" (local) or relative "2h" (ago)."""
    text = text.strip()
    rel = _RELATIVE.match(text)
    if rel:
        return (time.time() if now is None else now) - float(rel[1]) * _UNITS[rel[2]]
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad time {text!r}: use ISO-8601, 'YYYY-MM-DD HH:MM[:SS]' or e.g. '2h'") from None
    return stamp.timestamp()


def _default_jobs() -> int:
    """The CPUs this process may run on (its affinity, as taskset and cpusets set it), at
    most 8: each worker holds a 4 MB chunk and a bounded report, about 50 MB."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(8, usable))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="log files (plain or .gz)")
    parser.add_argument("--since", type=parse_time, help="only records at/after this time")
    parser.add_argument("--until", type=parse_time, help="only records before this time")
    parser.add_argument("--id", dest="request_id", help="show one request's full timeline")
    parser.add_argument("--ids", metavar="CODE",
                        help="list the request ids of the records with this code (warning_code,"
                             " error_code, or the gateway's HTTP status) within --since/--until,"
                             " one per line, in log order")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--top", type=int, default=10, help="rows in top-N tables")
    parser.add_argument("--jobs", type=int, default=_default_jobs(),
                        help="processes reading file ranges in parallel (1 = sequential; "
                             "default: the CPUs this process may use, at most 8)")
    parser.add_argument("--no-fast", action="store_true",
                        help="parse every line fully (slower; for checking the fast path)")
    parser.add_argument("--progress", action="store_true",
                        help="progress on stderr even when it is not a terminal")
    parser.add_argument("--strict", action="store_true",
                        help="exit 2 when a file could not be read whole (missing, "
                             "unreadable, a .gz cut short or corrupt); the report of what "
                             "could be read is printed either way")


class _Progress:
    """Bytes-read indicator on stderr, at most a few times a second."""

    def __init__(self, stats: ReadStats, stream: TextIO, total: int, on: bool) -> None:
        self.stats, self.stream, self.total, self.on = stats, stream, total, on
        self.next = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if self.on and now >= self.next:
            self.next = now + 0.5
            mb = self.stats.bytes_read / 1e6
            self.stream.write(f"\ranalyze: {mb:,.0f} MB read (files {self.total / 1e6:,.0f} MB"
                              f" on disk), {self.stats.lines:,} lines")
            self.stream.flush()

    def done(self) -> None:
        if self.on:
            self.stream.write("\n")


_Span = tuple[int, int | None]
_Task = tuple[list[tuple[Path, _Span]], float | None, float | None, int, bool]
PIECE = 64 << 20          # plain files are split into ranges this big for the workers
SCAN_CHUNK = 4 << 20      # bytes handed to the chunk scanner at a time
# Reading a file range stops at a chunk whose first and last records are this far past
# --until, so lines written slightly out of order near the bound are still read.
WINDOW_SLACK_S = 10.0


def _window(since: float | None, until: float | None) -> Window | None:
    if since is None and until is None:
        return None
    return Window(-math.inf if since is None else since, math.inf if until is None else until)


def _scan_file(path: Path, span: _Span, scanner: ChunkScanner, stats: ReadStats,
               window: Window | None, tick: Callable[[], None] = lambda: None) -> None:
    """One file range through the chunk scanner (which applies the window line by line);
    with a window the range is left at the first chunk past it (so the footer's line counts
    stop there)."""
    for chunk in read_chunks(path, span, stats, SCAN_CHUNK):
        tick()
        if window is not None:
            first, last = scanner.bounds(chunk)
            if first is not None and last is not None \
                    and min(first, last) >= window.until + WINDOW_SLACK_S:
                break                       # logs run forward: nothing after this matters
        scanner.scan(chunk, stats, window)


def _analyze_files(task: _Task, progress: _Progress | None = None) -> tuple[Report, ReadStats]:
    """Aggregate some files (already in time order) into one report. Runs in a worker process
    in parallel mode, so it takes and returns picklable values only."""
    paths, since, until, top, fast = task
    window = _window(since, until)
    parser, stats, report = RecordParser(), ReadStats(), Report(top=top)
    if progress is not None:
        progress.stats = stats
    if fast:
        scanner = ChunkScanner(parser, report)
        for path, span in paths:
            _scan_file(path, span, scanner, stats, window,
                       progress.tick if progress is not None else lambda: None)
        return report, stats
    add = report.add if window is None else partial(window.add, report)
    for n, record in enumerate(r for path, span in paths
                               for r in file_records(path, parser, stats, span=span)):
        add(record)
        if progress is not None and not n & 0xFFFF:
            progress.tick()
    return report, stats


def _add_stats(total: ReadStats, part: ReadStats) -> None:
    for name in ("lines", "records", "continuation", "malformed", "bytes_read"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.files += [f for f in part.files if not total.files or f != total.files[-1]]
    total.damaged += part.damaged


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _warn_damage(damaged: list[Damage], strict: bool, err: TextIO) -> int:
    """Warn about each damaged file (its first damage: a file split into ranges may report
    one per range); the exit status: 2 under ``--strict`` when there is any."""
    first: dict[str, Damage] = {}
    for damage in sorted(damaged, key=lambda d: d.offset):
        first.setdefault(damage.file, damage)
    for damage in first.values():
        print(f"analyze: warning: {damage}", file=err)
    if first and not strict:
        print(f"analyze: {len(first)} file(s) not read whole; the report covers what could be "
              "read (--strict makes this an error)", file=err)
    return 2 if first and strict else 0


def record_code(record: Record) -> str | None:
    """The code a record carries: the gateway's HTTP status on its lines, else warning_code,
    else error_code (as the report counts warnings and errors)."""
    fields = record.fields
    if record.event == GATEWAY_EVENT:
        return str(fields.get("status"))
    code = fields.get("warning_code") or fields.get("error_code")
    return None if code is None else str(code)


def matching_ids(records: Iterable[Record], code: str, window: Window | None) -> list[str]:
    """Request ids (first appearance first, each once) of the records with ``code``."""
    ids: dict[str, None] = {}
    for record in records:
        if record.request_id and record_code(record) == code \
                and (window is None or window.keeps(record.time)):
            ids.setdefault(record.request_id)
    return list(ids)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the analysis; 0 ok, 1 request id not found, 2 no file to read (or, with
    ``--strict``, a file not read whole)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    files = [p for p in args.files if p.is_file()]
    missing = [Damage(str(p), "no such file", 0, 0) for p in args.files if not p.is_file()]
    if not files:
        print(f"analyze: no such file: {', '.join(d.file for d in missing)}", file=err)
        return 2
    stats = ReadStats()
    progress = _Progress(stats, err, sum(_size(p) for p in files),
                         args.progress or err.isatty())
    parser = RecordParser()
    since, until = args.since, args.until
    window = _window(since, until)
    if args.request_id is not None:
        records = iter_records(files, parser, stats, keep_continuations=True,
                               needle=args.request_id.encode())
        wanted = args.request_id
        mention = re.compile(rf"(?<![\w-]){re.escape(wanted)}(?![\w-])")
        found: list[Record] = []
        for n, record in enumerate(records):
            # free-form lines ("synthesis failed: id=r2 ...") carry the id only in the text
            mine = record.request_id == wanted or (
                record.request_id is None and wanted in record.raw
                and mention.search(record.raw) is not None)
            if mine and (window is None or window.keeps(record.time)):
                found.append(record)
            if not n & 0xFFFF:
                progress.tick()
        progress.done()
        status = _warn_damage(missing + stats.damaged, args.strict, err)
        if not found:
            print(f"analyze: request {wanted} not found", file=err)
            return 1
        timeline = timeline_dict(wanted, found)
        out.write(dump_json(timeline) if args.json else render_timeline(timeline))
        return status
    if args.ids is not None:
        ids = matching_ids(iter_records(files, parser, stats, needle=args.ids.encode()),
                           args.ids, window)
        status = _warn_damage(missing + stats.damaged, args.strict, err)
        if not ids:
            print(f"analyze: no request with code {args.ids}", file=err)
            return 1
        out.write(dump_json({"code": args.ids, "request_ids": ids}) if args.json
                  else "".join(rid + "\n" for rid in ids))
        return status
    ordered = order_files(files, parser)
    pieces = [(path, span) for path in ordered for span in split_ranges(path, PIECE)]
    fast = not args.no_fast
    if fast and not NATIVE:
        print("analyze: the compiled scanner is not built (pip install . builds it); "
              "reading every line with the parser, several times slower", file=err)
    tasks: list[_Task] = [([piece], since, until, args.top, fast) for piece in pieces]
    jobs = max(1, min(args.jobs, len(tasks)))
    if jobs == 1:
        whole: _Span = (0, None)
        report, stats = _analyze_files(([(p, whole) for p in ordered], since, until, args.top,
                                        fast), progress)
    else:
        # one process per file range; the merge (in time order) joins requests split by
        # rotation or by a range boundary
        report, stats = Report(top=args.top), ReadStats()
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for part, part_stats in pool.imap(_analyze_files, tasks):
                report.merge(part)
                _add_stats(stats, part_stats)
                progress.stats = stats
                progress.tick()
    progress.done()
    damaged = missing + stats.damaged
    data = report.to_dict()
    stat_dict: dict[str, Any] = {"files": stats.files, "lines": stats.lines,
                                 "records": stats.records, "malformed": stats.malformed,
                                 "continuation": stats.continuation,
                                 "damaged": [asdict(d) for d in damaged]}
    if args.json:
        out.write(dump_json({**data, "input": stat_dict}))
    else:
        out.write(render_report(data, stat_dict))
    return _warn_damage(damaged, args.strict, err)
