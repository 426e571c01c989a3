"""The compiled chunk scanner (``analyze``'s fast path) gives the report the parser gives.

Each test compares the scanner with every line through :class:`RecordParser`: in process
(``ChunkScanner.scan`` against ``scan_slowly``: stats, report, pending starts, orphans, exact
histogram totals) or through the CLI (``analyze --json`` against ``--no-fast``), on lines the
contract and the app write, lines a fast shape must leave to the parser (repeated keys,
escapes, broken JSON, other key orders), random corruptions, randomly generated lines with
and without a window, full tables, out-of-order stamps and random decimals.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.analyze.cli import parse_time
from exporter.analyze.reader import ReadStats
from exporter.analyze.report import Report
from exporter.analyze.scan import NATIVE, ChunkScanner, Window, scanner_tables
from exporter.logs.parsers import RecordParser
from tests.bench.make_logs import generate

STAMP_JSON = '"time": "2026-11-22T10:00:01.000+00:00"'
STAMP_TEXT = "2026-11-22 10:00:01,000"
# Lines at the edges of the scanner's shapes: the parser decides what each one is, and the
# scanner must agree (reading it itself, or leaving it to the parser).
TRICKY = [
    # JSON: duplicates, aliases, escapes, types, broken lines, other orders and separators
    '{%s, "level": "INFO", "logger": "a", "event": "http_request", "event": '
    '"synthesis_complete", "request_id": "d1", "status": "failed", "error_code": "DUP"}',
    '{%s, "level": "INFO", "logger": "a", "event": "http_request", "level": "ERROR"}',
    '{%s, "level": "INFO", "logger": "a", "event": "synthesis_complete", "request_id": "d2", '
    '"status": "success", "status": "failed", "duration_ms": 5, "error_code": "TWICE", '
    '"text_len": 9, "model_stage": "x"}',
    '{%s, "level": "INFO", "logger": "a", "event": "synthesis_complete", "request_id": "a1", '
    '"result": "failed", "elapsed_ms": 70, "err_code": "ALIASED", "text_length": 3000, '
    '"model_stage": "x"}',
    '{%s, "level": "ERROR", "logger": "a", "event": "synthesis_complete", "request_id": "e1", '
    '"status": "failed", "duration_ms": 12, "error_code": "ESC", "text_len": 2048, '
    '"model_stage": "llm", "message": "bad \\"quote\\" and \\u00e9"}',
    '{%s, "level": "INFO", "logger": "a", "event": "synthesis_complete", "request_id": "t1", '
    '"status": true, "duration_ms": "12", "error_code": null, "text_len": 12.0, '
    '"model_stage": 3}',
    '{%s, "level": "INFO", "logger": "a", "event": "stage_time", "request_id": "s1", '
    '"stage": "llm_inference", "duration_ms": "slow"}',
    '{%s, "level": "INFO", "logger": "a", "event": "stage_time", "request_id": "s2", '
    '"stage": "audio_render", "duration_ms": 1e400}',
    '{%s, "level": "INFO", "logger": "a", "event": "stage_time", "request_id": "s3", '
    '"stage": "audio_render", "duration_ms": 7, "duration_ms": 9}',
    '{%s, "level": "INFO", "logger": "a", "event": "http_request", "request_id": "b1", '
    '"status": 200, "x": [1, 2]}',
    '{%s, "level": "INFO", "logger": "a", "event": "http_request", "route": "/v1/tts}',
    '{%s, "level": "INFO", "logger": "a", "event": "audio_metrics", "rms": 01}',
    '{%s, "level": "INFO", "logger": "a", "event": "audio_metrics", "note": "tab\there"}',
    '{%s, "level": "warn", "logger": "a", "event": "cache_write_failed"}',
    '{%s, "level": "WARN", "logger": "a", "event": "cache_write_failed"}',
    '{"level": "INFO", %s, "logger": "a", "event": "synthesis_start", "request_id": "o1", '
    '"text_len": 2048}',
    '{%s,"level":"INFO","logger":"a","event":"stage_time","request_id":"c1","stage":"x",'
    '"duration_ms":4}',
    '{%s, "level": "INFO", "logger": "a", "event": "infer_done", "request_id": "o1", '
    '"status": "failed", "duration_ms": 40, "error_code": "ALIASED_EVENT", '
    '"model_stage": "llm"}',
    '{%s, "level": "INFO", "logger": "a", "event": "synthesis_start", "request_id": "n1", '
    '"text_len": 99999999999999999999}',
    '{%s, "level": "INFO", "logger": "a", "event": "http_request"}   ',
    '[1, 2]',
    '{"time": "2026-11-22T10:00:01", "event": "broken',
    # true is truthy: the code is "True", not the UNKNOWN that null, false and "" give
    '{%s, "level": "ERROR", "logger": "a", "event": "synthesis_complete", "request_id": "b1", '
    '"status": "failed", "duration_ms": 5, "error_code": true, "model_stage": true, '
    '"text_len": 10}',
    '{%s, "level": "ERROR", "logger": "a", "event": "synthesis_complete", "request_id": "b2", '
    '"status": "failed", "duration_ms": 5, "error_code": false, "model_stage": null, '
    '"text_len": 10}',
]
TRICKY_TEXT = [
    '%s - app - INFO - synthesis_complete: id=q1, status="failed", duration_ms=30, '
    'error_code=QUOTED, text_len=2048, model_stage=llm',
    "%s - app - INFO - synthesis_complete: id=true, status=failed, duration_ms=31ms, "
    "error_code=0, text_len=86 chars, model_stage=llm",
    "%s - app - INFO - synthesis_complete: id=007, status=failed, duration_ms=1e3, "
    "error_code=NUMERIC_ID, text_len=2048, model_stage=",
    "%s - app - ERROR - synthesis_complete: id=r9, status=failed, duration_ms=8, "
    "result=success, error_code=ALIAS_AFTER, text_len=7, model_stage=llm",
    "%s - app - info - stage_time: id=r9, stage=llm, duration_ms=5",
    "%s - app\tx - INFO - stage_time: id=r9, stage=llm, duration_ms=5",
    "%s - app - INFO - stage_time: id=r9, stage=true, duration_ms=5",
    "%s - app - INFO - stage_time: id=r9, stage=llm, duration_ms=5, duration_ms=6",
    "%s - app - INFO - stage_time: garbage",
    "%s - app - ERROR - caught: 2026-11-22 10:00:01,000 - x - INFO - stage_time: id=f, "
    "stage=fake, duration_ms=999",
    "%s - app - WARN - free text with = and , inside",
    "%s - app - INFO - synthesis_start: id=ix, text_len=500",
    "%s - app - INFO - synthesis_complete: id=ix, status=failed, duration_ms=9, "
    "error_code=LEN_FROM_START, model_stage=llm",
    "%s - app - INFO - synthesis_complete: id=ix, status=success, duration_ms=9, "
    "model_stage=llm",
    # with a quote in the line the parser strips Unicode whitespace after unquoted values
    '%s - app - INFO - synthesis_start: id=u1\u00a0, text_len=5, note="x"',
    '%s - app - ERROR - synthesis_complete: id=u1, status=failed\u3000, duration_ms=5, '
    'error_code=E, note="x"',
    "%s - app - INFO - stage_time: id=u1, stage=llm\u0085, duration_ms=5, note='x'",
    # not numbers to the report: more digits than int() reads, a float past the double range
    "%s - app - INFO - http_request: n=" + "1" * 4301,
    "%s - app - INFO - stage_time: id=u2, stage=llm, duration_ms=" + "9" * 400,
    "%s - app - INFO - stage_time: id=u2, stage=llm, duration_ms=" + "9" * 400 + ".5",
    '{"time": "0001-01-01T00:00:30+01:00", "level": "INFO", "logger": "a", '
    '"event": "http_request"}',
    # quoted values with escapes, as the app writes a failure's message
    '%s - app - ERROR - synthesis_complete: id=m5, status=failed, duration_ms=1.5, '
    'error_code=ESCAPED, text_len=2048, model_stage=audio_render, '
    'message="scipy.fft failed: invalid value, \\"len\\"=2048"',
    '%s - app - ERROR - synthesis_complete: id=m6, status=failed, duration_ms=2, '
    'error_code=BACKSLASH_LAST, note="ends in \\\\", text_len=9',
    '%s - app - ERROR - synthesis_complete: id=m7, status=failed, duration_ms=2, '
    'error_code=OPEN_ESCAPE, text_len=9, note="a\\',
    "%s - app - INFO - synthesis_start: id=m8, text_len=3, note='it\\'s', voice=x",
    # IndexTTS logs the text itself and no text_len: its length in characters counts
    '%s - app - INFO - synthesis_start: id=t1, text="今天天气真好", lang=zh',
    "%s - app - INFO - synthesis_complete: id=t1, status=failed, error_code=E, duration_ms=3",
    '%s - app - INFO - synthesis_complete: id=t2, status=failed, error_code=E, text="a, \\"b"',
    "%s - app - INFO - synthesis_start: id=t3, text=, text_len=x",
    '{%s, "level": "INFO", "logger": "a", "event": "synthesis_start", "request_id": "t4", '
    '"text": "\\u00e9t\\u00e9"}',
    '{%s, "level": "INFO", "logger": "a", "event": "synthesis_complete", "request_id": "t4", '
    '"status": "failed", "error_code": "J", "text": null}',
    "Traceback (most recent call last):",
    "   ",
    "",
    "\r",
]


def _analyze(*args: str) -> dict:
    env = {**os.environ, "TZ": "UTC"}
    result = subprocess.run([sys.executable, "-m", "exporter", "analyze", "--json", *args],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    data["input"].pop("files")
    return data


def _stamped(line: str) -> str:
    """The line with its time in place of ``%s`` (JSON or text form, by the first byte)."""
    return line.replace("%s", STAMP_JSON if line.startswith("{") else STAMP_TEXT, 1)


def _tricky_lines() -> list[str]:
    return [_stamped(line) for line in TRICKY + TRICKY_TEXT]


def _assert_fast_equals_full(path: Path) -> dict:
    top = ("--top", "40")           # every error code the tricky lines make, not the top 10
    full = _analyze("--no-fast", "--jobs", "1", *top, str(path))
    assert _analyze("--jobs", "1", *top, str(path)) == full
    return full


def _fast_and_slow(data: bytes, parser: RecordParser | None = None,
                   window: Window | None = None, cuts: random.Random | None = None
                   ) -> tuple[ChunkScanner, ChunkScanner]:
    """The same lines through the compiled scanner (where the aliases allow it; in chunks
    cut at random line ends when ``cuts`` is given) and line by line through the parser:
    line counts, reports, pending starts, orphans and the exact histogram totals must
    agree."""
    parser = parser or RecordParser()
    fast, fast_stats = ChunkScanner(parser, Report()), ReadStats()
    assert (fast._native is None) == (scanner_tables(parser) is None)
    pos = 0
    while pos < len(data):
        cut = -1 if cuts is None else data.find(b"\n", pos + cuts.randrange(1, 40_000))
        end = len(data) if cut < 0 else cut + 1
        fast.scan(data[pos:end], fast_stats, window)
        pos = end
    slow, slow_stats = ChunkScanner(parser, Report()), ReadStats()
    slow.scan_slowly(data, slow_stats, window)
    assert fast_stats == slow_stats
    assert fast.report.to_dict() == slow.report.to_dict()
    assert list(fast.report.pending.items()) == list(slow.report.pending.items())
    assert fast.report.orphans == slow.report.orphans
    assert fast.report.durations.total == slow.report.durations.total
    assert {k: h.total for k, h in fast.report.stages.items()} == \
        {k: h.total for k, h in slow.report.stages.items()}
    return fast, slow


@pytest.fixture(autouse=True)
def _compiled_scanner_built() -> None:
    """Without the extension every comparison here would pit the parser against itself:
    make builds _scan.c, so its absence fails these tests rather than skipping them."""
    assert NATIVE, "exporter/analyze/_scan.c is not built (make builds it)"


@pytest.mark.slow
def test_tricky_lines_get_the_full_parsers_verdict(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    lines = list(generate(300)) + _tricky_lines() + list(generate(300, seed=8))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    full = _assert_fast_equals_full(path)
    codes = {e["code"] for e in full["error_codes"]}
    # the parser's own verdicts, which the fast path had to reproduce
    assert {"DUP", "ALIASED", "ESC", "QUOTED", "ALIAS_AFTER", "ALIASED_EVENT",
            "LEN_FROM_START", "ESCAPED", "BACKSLASH_LAST"} <= codes
    assert full["input"]["malformed"] >= 5


@pytest.mark.slow
def test_random_corruption_of_generated_logs(tmp_path: Path) -> None:
    rnd = random.Random(11)
    lines = list(generate(6000))
    for i in rnd.sample(range(len(lines)), 600):
        line = lines[i]
        cut = rnd.randrange(1, max(2, len(line)))
        kind = rnd.randrange(5)
        if kind == 0:                               # a character lost
            lines[i] = line[:cut] + line[cut + 1:]
        elif kind == 1:                             # a write cut short
            lines[i] = line[:cut]
        elif kind == 2:                             # a byte flipped
            lines[i] = line[:cut] + rnd.choice('"\\,:={} \t') + line[cut + 1:]
        elif kind == 3:                             # two pairs swapped
            parts = line.split(", ")
            if len(parts) > 3:
                a, b = rnd.sample(range(1, len(parts) - 1), 2)
                parts[a], parts[b] = parts[b], parts[a]
            lines[i] = ", ".join(parts)
        else:                                       # a pair repeated with another value
            parts = line.split(", ")
            if len(parts) < 2:
                continue
            extra = parts[rnd.randrange(1, len(parts))].rstrip("}")
            key = extra.split("=")[0].split(":")[0]
            lines[i] = line.rstrip("}") + ", " + key + ('": "zz"' if line.startswith("{")
                                                        else "=zz") \
                + ("}" if line.endswith("}") else "")
    path = tmp_path / "app.log"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _assert_fast_equals_full(path)


def test_mixed_formats_keep_file_order_for_lengths() -> None:
    """A JSON start and a text completion without text_len: the join needs file order
    across the formats, which the scanner keeps by reading both in one pass."""
    lines = [
        '{%s, "level": "INFO", "logger": "a", "event": "synthesis_start", "request_id": "m1", '
        '"text_len": 2048}',
        "%s - app - ERROR - synthesis_complete: id=m1, status=failed, duration_ms=9, "
        "error_code=SCIPY_FFT_INVALID, model_stage=llm",
        "%s - app - INFO - synthesis_start: id=m2, text_len=12",
        '{%s, "level": "INFO", "logger": "a", "event": "synthesis_complete", '
        '"request_id": "m2", "status": "success", "duration_ms": 3, "model_stage": "x"}']
    fast, _ = _fast_and_slow(("\n".join(map(_stamped, lines)) + "\n").encode())
    rows = {row["bucket"]: row for row in fast.report.to_dict()["failures_by_text_length"]}
    assert rows["2048"]["failed"] == 1
    assert rows["0-64"]["total"] == 1


def test_reused_request_ids_match_in_file_order() -> None:
    lines = []
    for length in (12, 2048, 12):
        lines += [f"{STAMP_TEXT} - app - INFO - synthesis_start: id=retry, text_len={length}",
                  f"{STAMP_TEXT} - app - ERROR - synthesis_complete: id=retry, status=failed, "
                  "duration_ms=5, error_code=X, model_stage=llm"]
    fast, _ = _fast_and_slow(("\n".join(lines) + "\n").encode())
    lengths = fast.report.to_dict()["failures_by_text_length"]
    assert {r["bucket"]: r["total"] for r in lengths} == {"0-64": 2, "2048": 1}


@pytest.mark.slow
def test_window_verdicts_per_line_match_the_parser_through_the_cli(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """With --since/--until the scanner keeps or drops each line by its own time; the
    result is the full parser's, also when many small chunks straddle and surround the
    window and reading stops at the first chunk past it."""
    import exporter.analyze.cli as cli
    from exporter.__main__ import main

    path = tmp_path / "app.log"
    path.write_text("\n".join(generate(20_000)) + "\n")
    window = ["--since", "2026-11-22T10:00:00.5+00:00", "--until", "2026-11-22T10:00:02.5+00:00"]
    full = _analyze("--no-fast", "--jobs", "1", *window, str(path))
    monkeypatch.setattr(cli, "SCAN_CHUNK", 64 << 10)
    monkeypatch.setattr(cli, "WINDOW_SLACK_S", 0.1)
    monkeypatch.setenv("TZ", "UTC")
    assert main(["analyze", "--json", "--jobs", "1", *window, str(path)]) == 0
    fast = json.loads(capsys.readouterr().out)
    fast["input"].pop("files")
    assert fast["syntheses"] == full["syntheses"]
    assert fast["syntheses"]["total"] > 0
    for key in ("levels", "error_codes", "failures_by_text_length", "stages", "slowest",
                "duration_ms", "time_range"):
        assert fast[key] == full[key], key


def test_tricky_lines_counted_and_reported_like_the_parser_in_process() -> None:
    """The same lines as through the CLI, here also comparing the pending starts, orphans
    and exact histogram totals."""
    _fast_and_slow(("\n".join(_tricky_lines()) + "\n").encode())


def test_residue_lines_keep_their_place_in_joins() -> None:
    """A text start then a JSON completion that only the full parser reads (keys in another
    order) and that takes its text length from the start: file order must hold."""
    lines = [
        "%s - app - INFO - synthesis_start: id=k1, text_len=2048",
        '{"level": "ERROR", %s, "logger": "a", "event": "synthesis_complete", '
        '"request_id": "k1", "status": "failed", "duration_ms": 9, "error_code": "LATE_JSON", '
        '"model_stage": "llm"}']
    fast, _ = _fast_and_slow(("\n".join(map(_stamped, lines)) + "\n").encode())
    assert [r["bucket"] for r in fast.report.to_dict()["failures_by_text_length"]] == ["2048"]


@pytest.mark.slow
def test_window_takes_lengths_from_starts_only_the_parser_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import exporter.analyze.cli as cli
    from exporter.__main__ import main

    filler = ('{"time": "2026-11-22T10:00:%02d.000+00:00", "level": "INFO", "logger": "a", '
              '"event": "http_request", "request_id": "h", "status": 200}')
    lines = [filler % 0] * 3000 + [
        '{"level": "INFO", "time": "2026-11-22T10:00:00.000+00:00", "logger": "a", '
        '"event": "synthesis_start", "request_id": "w1", "text_len": 2048}'] \
        + [filler % 1] * 3000 + [filler % 9] * 3000 + [
        "2026-11-22 10:00:09,000 - app - ERROR - synthesis_complete: id=w1, status=failed, "
        "duration_ms=9, error_code=FROM_BEFORE, model_stage=llm"] + [filler % 9] * 3000
    path = tmp_path / "app.log"
    path.write_text("\n".join(lines) + "\n")
    window = ["--since", "2026-11-22T10:00:05+00:00", "--until", "2026-11-22T10:00:30+00:00"]
    full = _analyze("--no-fast", "--jobs", "1", *window, str(path))
    monkeypatch.setattr(cli, "SCAN_CHUNK", 64 << 10)
    monkeypatch.setattr(cli, "WINDOW_SLACK_S", 0.5)
    monkeypatch.setenv("TZ", "UTC")
    assert main(["analyze", "--json", "--jobs", "1", *window, str(path)]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["failures_by_text_length"] == full["failures_by_text_length"]
    assert [r["bucket"] for r in fast["failures_by_text_length"]] == ["2048"]


# --- the compiled scanner's own risks, line by line against the parser ---------------------

_JSON_VALUES = ['"ts_1"', '"ts_2"', '""', '12', '-0', '0', '1.5', '1e3', '-3', 'true', 'false',
                'null', '"failed"', '"success"', '"a\\nb"', '"é"', '"86 chars"',
                '123456789012345678', '1234567890123456789', '[1]', '01', '1e400', '-0.0',
                '"x' + 'y' * 60 + '"', '2048', '65', '4097']
_TEXT_VALUES = ['ts_1', 'ts_2', 'failed', 'success', '12', '-0', '86 chars', '523 ms', '1.5',
                'true', 'False', '"quoted, x"', "'single'", '', 'é', '12abc', '-', 'x y',
                'x ', '2048', '4097', '65 char', '7%', '-0.0', 'z' * 60, '1.5.2', '007',
                '"esc\\"aped"', 'a=b']
_KEYS = ['id', 'request_id', 'task_id', 'status', 'result', 'duration_ms', 'elapsed_ms',
         'error_code', 'err_code', 'code', 'text_len', 'text_length', 'chars', 'model_stage',
         'stage', 'lang', 'note', 'level', 'time', 'event', 'traceback', 'text',
         'warning_code', 'warn_code', 'upstream_status']
_EVENTS = ['synthesis_start', 'synthesis_complete', 'stage_time', 'http_request', 'infer_done',
           'gateway_request', 'request_rejected',
           'infer_start', 'audio_metrics', 'Synthesis_complete', '']
_LEVELS = ['INFO', 'ERROR', 'WARN', 'warn', 'Info', 'CRITICAL', 'L' * 60]


def _random_line(rnd: random.Random) -> str:
    """A record line in either format, with keys, values, levels and stamps drawn to hit
    every branch of the scanner: table overflow, odd values, aliases, repeats, stamps of
    many classes out of order."""
    kind = rnd.random()
    if kind < 0.05:
        return rnd.choice(["Traceback (most recent call last):", "   ", "", "\r", "  x"])
    minute, second = rnd.randrange(3), rnd.randrange(60)
    frac = rnd.choice(["", ".5", ".123", ".123456", ",250"])
    level = rnd.choice([*_LEVELS, f"LEVEL{rnd.randrange(40)}"])
    event = rnd.choice(_EVENTS)
    keys = rnd.sample(_KEYS, rnd.randrange(0, 7))
    if event in ("synthesis_start", "synthesis_complete", "stage_time") and rnd.random() < 0.8:
        keys = ["request_id" if kind < 0.5 else "id"] + [k for k in keys if "id" not in k]
        if rnd.random() < 0.6:
            keys = [k for k in keys if k not in ("level", "time", "event")]
    if kind < 0.5:
        zone = rnd.choice(["+00:00", "Z", "+02:00", ""])
        stamp = f"2026-11-22T10:{minute:02d}:{second:02d}{frac.replace(',', '.')}{zone}"
        pairs = "".join(f', "{k}": {rnd.choice(_JSON_VALUES)}' for k in keys)
        if rnd.random() < 0.3:         # plain values the report reads, as the app writes them
            status = rnd.choice(["failed", "success", f"S{rnd.randrange(40)}"])
            pairs += f', "status": "{status}"'
        return (f'{{"time": "{stamp}", "level": "{level}", "logger": "a", '
                f'"event": "{event}"{pairs}}}')
    stamp = f"2026-11-22 10:{minute:02d}:{second:02d}{frac}"
    pairs = ", ".join(f"{k}={rnd.choice(_TEXT_VALUES)}" for k in keys)
    if rnd.random() < 0.3:
        pairs += f"{', ' if pairs else ''}error_code=E{rnd.randrange(40)}, status=failed"
    body = f"{event}: {pairs}" if event else f"free text {pairs}"
    return f"{stamp} - app - {level} - {body}"


# windows over the random lines' stamps (10:00-10:02 UTC, and 08:00-08:02 for +02:00)
_WINDOWS = [None, (parse_time("2026-11-22T10:01:00+00:00"), parse_time("2026-11-22T10:02:00Z")),
            (parse_time("2026-11-22T10:00:30.5+00:00"), math.inf),
            (-math.inf, parse_time("2026-11-22T10:01:59.123+00:00"))]


@pytest.mark.parametrize(("seed", "window"), [(seed, window) for seed in range(4)
                                              for window in _WINDOWS])
def test_compiled_scanner_matches_the_parser_line_by_line(
        seed: int, window: tuple[float, float] | None) -> None:
    rnd = random.Random(seed)
    lines = [_random_line(rnd) for _ in range(3000)]
    lines += list(generate(400, seed=seed))
    rnd.shuffle(lines)
    data = ("\n".join(lines) + "\n").encode()
    fast, slow = _fast_and_slow(data, window=None if window is None else Window(*window),
                                cuts=rnd)
    assert fast._native is not None
    assert fast.report.durations.buckets == slow.report.durations.buckets
    assert fast.report.to_dict()["syntheses"]["total"] > 50


def test_scanner_segments_end_when_its_tables_fill() -> None:
    """Fifty levels, statuses, stages, error codes and minutes: more than any of the
    scanner's tables holds, so it ends segments early and resumes; nothing is lost."""
    lines = []
    for i in range(50):
        lines += [
            f'{{"time": "2026-11-22T1{i % 10}:{i:02d}:00.000+00:00", "level": "LVL{i}", '
            f'"logger": "a", "event": "synthesis_complete", "request_id": "r{i}", '
            f'"status": "S{i}", "duration_ms": {i}, "text_len": {i * 97}}}',
            f"2026-11-22 09:{i:02d}:30,000 - app - ERROR - synthesis_complete: id=f{i}, "
            f"status=failed, duration_ms={i}.5, error_code=CODE{i}, model_stage=m{i}, "
            f"text_len={i * 89}",
            f"2026-11-22 09:{i:02d}:31,000 - app - INFO - stage_time: id=f{i}, "
            f"stage=stage{i}, duration_ms={i}"]
    fast, _ = _fast_and_slow(("\n".join(lines) + "\n").encode())
    result = fast.report.to_dict()
    assert len(result["levels"]) == 52
    assert len(result["stages"]) == 50
    assert result["time_range"]["first"] < result["time_range"]["last"]


def test_time_range_is_exact_when_lines_are_out_of_order() -> None:
    """The largest stamp sits mid-chunk, in another zone and fraction layout."""
    lines = [
        '{"time": "2026-11-22T10:00:05.000+00:00", "level": "INFO", "logger": "a", '
        '"event": "http_request"}',
        '{"time": "2026-11-22T12:59:59.5+02:00", "level": "INFO", "logger": "a", '
        '"event": "http_request"}',                                   # 10:59:59.5 UTC
        "2026-11-22 09:59:58,999 - app - INFO - free text",
        '{"time": "2026-11-22T10:00:01.000+00:00", "level": "INFO", "logger": "a", '
        '"event": "http_request"}']
    parser = RecordParser()
    scanner = ChunkScanner(parser, Report())
    scanner.scan(("\n".join(lines) + "\n").encode(), ReadStats())
    first, last = (scanner.report.to_dict()["time_range"][k] for k in ("first", "last"))
    assert last == parser.stamp("2026-11-22T12:59:59.5+02:00", False)
    assert first == parser.stamp("2026-11-22 09:59:58,999", True)


def test_alias_configurations_the_scanner_cannot_mirror_parse_every_line() -> None:
    from exporter.analyze.scan import scanner_tables
    from exporter.config import AliasConfig

    assert scanner_tables(RecordParser()) is not None
    odd = AliasConfig(fields={"status": ["status", "id"], "id": ["request_id"]})
    assert scanner_tables(RecordParser(odd)) is None
    from_head = AliasConfig(fields={"error_code": ["error_code", "logger"]})
    assert scanner_tables(RecordParser(from_head)) is None
    line = (b'{"time": "2026-11-22T10:00:00.000+00:00", "level": "INFO", "logger": "a", '
            b'"event": "synthesis_complete", "id": "failed", "duration_ms": 5}\n')
    fast, _ = _fast_and_slow(line, RecordParser(odd))
    assert fast.report.to_dict()["syntheses"]["by_status"] == {"failed": 1}


def test_many_minutes_and_long_codes_take_their_own_paths() -> None:
    """Forty minutes of one level (more stamp classes than the scanner keeps at once) and an
    error code too long for its tables (left to the parser)."""
    lines = [f"2026-11-22 10:{m:02d}:00,000 - app - INFO - free text" for m in range(40)]
    lines.append("2026-11-22 11:00:00,000 - app - ERROR - synthesis_complete: id=x1, "
                 f"status=failed, duration_ms=5, error_code={'E' * 80}, text_len=3")
    fast, _ = _fast_and_slow(("\n".join(lines) + "\n").encode())
    assert fast.report.to_dict()["error_codes"][0]["code"] == "E" * 80


def test_pending_starts_are_evicted_oldest_first_like_the_report(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.analyze.report as report_module
    import exporter.analyze.scan as scan_module

    monkeypatch.setattr(report_module, "PENDING_CAP", 5)
    monkeypatch.setattr(scan_module, "PENDING_CAP", 5)
    lines = [f"2026-11-22 10:00:00,000 - app - INFO - synthesis_start: id=p{i}, text_len={i}"
             for i in range(12)]
    lines += ["2026-11-22 10:00:01,000 - app - ERROR - synthesis_complete: id=p2, "
              "status=failed, duration_ms=5, error_code=EVICTED, model_stage=llm",
              "2026-11-22 10:00:01,000 - app - ERROR - synthesis_complete: id=p9, "
              "status=failed, duration_ms=5, error_code=KEPT, model_stage=llm"]
    fast, slow = _fast_and_slow(("\n".join(lines) + "\n").encode())
    assert list(fast.report.pending) == list(slow.report.pending) == \
        ["p7", "p8", "p10", "p11"]
    assert fast.report.orphans == [("p2", "EVICTED")]


def test_decimal_durations_convert_exactly_as_float_does() -> None:
    """Durations take the scanner's own decimal conversion where it is exact (Clinger's fast
    path) and CPython's elsewhere: every value must be the double float() gives."""
    rnd = random.Random(3)

    def number(json: bool) -> str:
        digits = "".join(rnd.choice("0123456789") for _ in range(rnd.randrange(1, 20)))
        whole, fraction = digits[:rnd.randrange(1, len(digits) + 1)], digits
        whole = whole.lstrip("0") or "0"
        text = f"{'-' if rnd.random() < 0.2 else ''}{whole[:18]}.{fraction[:rnd.randrange(1, 25)]}"
        if json and rnd.random() < 0.4:
            text += f"e{rnd.choice(['', '+', '-'])}{rnd.randrange(0, 40)}"
        return text

    lines = []
    for i in range(3000):
        json_line = i % 2 == 0
        value = number(json_line)
        lines.append(
            f'{{"time": "2026-11-22T10:00:00.000+00:00", "level": "INFO", "logger": "a", '
            f'"event": "stage_time", "request_id": "d{i}", "stage": "s", "duration_ms": {value}}}'
            if json_line else f"2026-11-22 10:00:00,000 - app - INFO - stage_time: id=d{i}, "
                              f"stage=s, duration_ms={value}{rnd.choice(['', ' ms', 'ms'])}")
    fast, slow = _fast_and_slow(("\n".join(lines) + "\n").encode())
    values = fast.report.stages["s"].values
    assert values is not None
    assert len(values) == 3000
    assert [v.hex() for v in values] == [v.hex() for v in slow.report.stages["s"].values or []]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_apps_own_lines_all_take_the_compiled_path(fmt: str, tmp_path: Path) -> None:
    """What tts_app writes (tracebacks, quoted messages with escapes, decimals) is read by
    the scanner itself, with the parser's result: none of it falls back line by line."""
    from tts_app.logging import StructuredLog

    clock = iter(1_795_000_000 + i * 0.0007 for i in range(100_000))
    log = StructuredLog(tmp_path / "app.log", fmt=fmt, clock=lambda: next(clock))
    for i in range(300):
        rid = f"req-{i:06x}"
        log.event("synthesis_start", rid, text_len=[12, 2048][i % 2], lang="zh",
                  voice="default", cache_hit=False)
        for stage in ("text_normalize", "llm_inference", "audio_render"):
            log.event("stage_time", rid, stage=stage, duration_ms=round(i * 1.37 % 900, 3))
        if i % 2:
            log.event("backend_exception", rid, level="ERROR", error_code="MODEL_ERROR",
                      exception_type="RuntimeError", exception_msg="invalid value, len=2048",
                      traceback='Traceback (most recent call last):\n  File "x.py", line 1\n'
                                "RuntimeError: invalid value")
            log.event("synthesis_complete", rid, level="ERROR", status="failed",
                      duration_ms=12.5, error_code="SCIPY_FFT_INVALID", cache_hit=False,
                      text_len=2048, model_stage="audio_render",
                      message='scipy.fft failed: "len"=2048, \\ rest')
        else:
            log.event("audio_metrics", rid, rms=0.12, spectral_centroid=1800.5)
            log.event("synthesis_complete", rid, status="success", duration_ms=0.0,
                      error_code="none", cache_hit=True, audio_size_kb=12.5, text_len=12,
                      model_stage="audio_render")
        log.event("http_request", rid, method="POST", route="/v1/tts", status=200,
                  duration_ms=5.25)
    log.close()
    data = (tmp_path / "app.log").read_bytes()
    fast, _ = _fast_and_slow(data)
    codes = fast.report.to_dict()["error_codes"]
    assert [(c["code"], c["count"]) for c in codes] == [("SCIPY_FFT_INVALID", 150)]
    fallbacks: list[bytes] = []

    class Counting(ChunkScanner):
        def _add_residue(self, line: bytes, *rest: object) -> None:
            fallbacks.append(line)

    Counting(RecordParser(), Report()).scan(data, ReadStats())
    assert fallbacks == []
