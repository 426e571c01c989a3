"""``tts-exporter analyze`` on crafted rotated logs (golden outputs) and generated ones."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from exporter.__main__ import main
from exporter.analyze.cli import parse_time
from exporter.analyze.reader import ReadStats, file_records, iter_records, order_files, split_ranges
from exporter.analyze.report import (
    EXACT_CAP,
    PENDING_CAP,
    LogHistogram,
    Report,
    as_duration,
    length_bucket,
)
from exporter.logs.parsers import Record, RecordParser

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "analyze"
# deliberately not in time order: the reader must order them by first timestamp
FILES = [str(GOLDEN / n) for n in ("app.log", "app.log.1", "app.log.2.gz")]


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TZ": "UTC"}
    return subprocess.run([*prefix, sys.executable, "-m", "exporter", "analyze", *args],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def _golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def _basenames(data: dict) -> dict:
    if "input" in data:
        data["input"]["files"] = [Path(f).name for f in data["input"]["files"]]
    return data


@pytest.mark.slow
def test_report_json_matches_golden() -> None:
    result = _cli("--json", *FILES)
    assert result.returncode == 0, result.stderr
    assert _basenames(json.loads(result.stdout)) == _golden("expected_report.json")


@pytest.mark.slow
def test_report_window_matches_golden() -> None:
    result = _cli("--json", "--since", "2026-11-22T10:00:03+00:00",
                  "--until", "2026-11-22 10:00:06", *FILES)
    assert result.returncode == 0, result.stderr
    data = _basenames(json.loads(result.stdout))
    assert data == _golden("expected_report_window.json")
    # r2's start lies before the window, its failure inside: the length still comes through
    assert {"bucket": "2048", "failed": 2, "failure_ratio": 1.0, "top_error": "SCIPY_FFT_INVALID",
            "top_error_share": 1.0, "total": 2} in data["failures_by_text_length"]


@pytest.mark.slow
def test_timeline_across_rotation_matches_golden() -> None:
    result = _cli("--json", "--id", "r2", *FILES)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == _golden("expected_timeline_r2.json")
    events = [r["event"] or r["message"].split(":")[0] for r in data["records"]]
    # starts in app.log.2.gz (JSON), ends in app.log.1 (text)
    assert events == ["synthesis_start", "stage_time", "stage_time", "synthesis failed",
                      "synthesis_complete", "http_request"]
    assert data["records"][3]["traceback"][-1].startswith("ValueError: invalid number")
    assert [s["offset_ms"] for s in data["stages"]] == [200.0, 1000.0]
    assert data["status"] == "failed"
    assert data["span_ms"] == 1130.0


@pytest.mark.slow
def test_human_report_key_lines() -> None:
    result = _cli(*FILES)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert any(line.split()[:4] == ["2048", "2", "2", "100.0%"]
               and "SCIPY_FFT_INVALID (100%)" in line for line in lines)
    assert "malformed lines: 1" in out
    assert "failure ratio 50.00%" in out
    assert "P50=600.0 P95=5000.0 P99=5000.0" in out
    assert "(exact)" in out
    assert lines[lines.index("Slowest syntheses") + 3].split() == ["r6", "5000.0"]


@pytest.mark.slow
def test_human_timeline_shows_traceback_and_offsets() -> None:
    out = _cli("--id", "r2", *FILES).stdout
    assert "Request r2: failed" in out
    assert "| ValueError: invalid number of data points (0) specified" in out
    assert "+1120ms  ERROR    synthesis_complete" in out


@pytest.mark.slow
def test_unknown_id_and_missing_file_fail_cleanly() -> None:
    unknown = _cli("--id", "nope", *FILES)
    assert unknown.returncode == 1
    assert "not found" in unknown.stderr
    missing = _cli("/nonexistent/app.log")
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


def test_progress_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--progress", *FILES]) == 0
    assert "analyze:" in capsys.readouterr().err
    assert main(["analyze", *FILES]) == 0          # stderr is not a TTY here
    assert capsys.readouterr().err == ""


def test_parse_time_forms() -> None:
    assert parse_time("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_time("30m", now=100.0) == 100.0 - 1800
    assert parse_time("2026-11-22T10:00:00+00:00") == 1795341600.0
    os.environ["TZ"] = "UTC"
    try:
        import time

        time.tzset()
        assert parse_time("2026-11-22 10:00") == 1795341600.0
        assert parse_time("2026-11-22 10:00:30") == 1795341630.0
    finally:
        del os.environ["TZ"]
        time.tzset()
    with pytest.raises(Exception, match="bad time"):
        parse_time("yesterday-ish")


def test_order_files_keeps_untimed_files_in_place(tmp_path: Path) -> None:
    late = tmp_path / "late.log"
    late.write_text("2026-11-22 11:00:00,000 - a - INFO - x: id=1\n")
    untimed = tmp_path / "untimed.log"
    untimed.write_text("just text\n")
    early = tmp_path / "early.log.gz"
    early.write_bytes(gzip.compress(b'{"time": 1795341600, "level": "INFO", "event": "x"}\n'))
    assert order_files([late, untimed, early], RecordParser()) == [early, untimed, late]


def test_histogram_bounded_and_accurate() -> None:
    rnd = random.Random(3)
    values = [rnd.lognormvariate(6, 1) for _ in range(50_000)]
    hist = LogHistogram()
    for v in values:
        hist.add(v)
    assert not hist.exact
    assert len(hist.buckets) < 1000
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[math.ceil(q * len(values)) - 1]
        estimate = hist.quantile(q)
        assert estimate is not None
        assert abs(estimate - exact) / exact < 0.011
    small = LogHistogram()
    for v in range(1, EXACT_CAP):
        small.add(float(v))
    assert small.exact
    assert small.quantile(0.5) == EXACT_CAP // 2


def test_length_buckets_isolate_2048() -> None:
    assert length_bucket(2048) == "2048"
    assert length_bucket(2047) == "1025-2047"
    assert length_bucket(12) == "0-64"
    assert length_bucket(5000) == ">4096"


def test_report_state_stays_bounded() -> None:
    parser = RecordParser()
    report = Report(top=3)

    def parse(line: bytes) -> Record:
        record = parser.parse(line)
        assert record is not None
        return record

    for i in range(PENDING_CAP + 50):
        report.add(parse(f'{{"time": 1, "level": "INFO", "event": "synthesis_start", '
                                f'"request_id": "q{i}", "text_len": 5}}'.encode()))
    assert len(report.pending) == PENDING_CAP
    for i in range(100):
        report.add(parse(f'{{"time": 2, "level": "INFO", "event": "synthesis_complete",'
                                f' "request_id": "c{i}", "status": "success", '
                                f'"duration_ms": {i}}}'.encode()))
    assert sorted(report.slowest) == [(97.0, "c97"), (98.0, "c98"), (99.0, "c99")]


@pytest.mark.slow
def test_split_gz_and_plain_equals_single_file(tmp_path: Path) -> None:
    make_logs = pytest.importorskip("tests.bench.make_logs")
    lines = list(make_logs.generate(30_000))
    whole = tmp_path / "whole.log"
    whole.write_text("\n".join(lines) + "\n")
    cut1, cut2 = 10_001, 20_003          # cut through requests (and maybe a traceback)
    (tmp_path / "app.log.2.gz").write_bytes(gzip.compress(
        ("\n".join(lines[:cut1]) + "\n").encode()))
    (tmp_path / "app.log.1").write_text("\n".join(lines[cut1:cut2]) + "\n")
    (tmp_path / "app.log").write_text("\n".join(lines[cut2:]) + "\n")
    one = json.loads(_cli("--json", str(whole)).stdout)
    split = json.loads(_cli("--json", *(str(tmp_path / n) for n in
                                        ("app.log", "app.log.2.gz", "app.log.1"))).stdout)
    full = json.loads(_cli("--json", "--no-fast", "--jobs", "1", str(whole)).stdout)
    for data in (one, split, full):
        data.pop("input")
    assert split == one == full
    stats = ReadStats()
    count = sum(1 for _ in iter_records([whole], RecordParser(), stats))
    assert count == stats.records > 0


@pytest.mark.slow
def test_parallel_sequential_and_full_parse_agree() -> None:
    seq = _basenames(json.loads(_cli("--json", "--jobs", "1", *FILES).stdout))
    par = _basenames(json.loads(_cli("--json", "--jobs", "2", *FILES).stdout))
    full = _basenames(json.loads(_cli("--json", "--no-fast", *FILES).stdout))
    assert seq == par == full == _golden("expected_report.json")


@pytest.mark.parametrize("piece", [97, 256, 1000])
def test_byte_ranges_read_every_line_once(tmp_path: Path, piece: int) -> None:
    path = tmp_path / "app.log"
    lines = [f"2026-11-22 10:00:{i % 60:02d},000 - a - INFO - x: id=q{i}, n={'z' * (i % 37)}"
             for i in range(300)]
    path.write_text("\n".join(lines) + "\n")
    parser, seen = RecordParser(), []
    for span in split_ranges(path, piece):
        stats = ReadStats()
        seen += [r.request_id for r in file_records(path, parser, stats, span=span)]
    assert seen == [f"q{i}" for i in range(300)]


def test_chunked_parallel_matches_golden(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import exporter.analyze.cli as cli

    monkeypatch.setattr(cli, "PIECE", 300)     # many ranges: requests split between workers
    assert main(["analyze", "--json", "--jobs", "2", *FILES]) == 0
    data = _basenames(json.loads(capsys.readouterr().out))
    expected = _golden("expected_report.json")
    # time stamps are rendered only in the human form, so TZ does not matter here
    assert data == expected


@pytest.mark.parametrize("chunk", [48, 300, 1 << 20])
def test_timeline_reads_a_traceback_into_chunks_without_the_id(
        chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """--id skips chunks that lack the id, but not the traceback lines that continue a kept
    record there: the record is the one a full read gives, whatever the chunk size, and
    every line is still counted."""
    import exporter.analyze.reader as reader

    paths = [Path(f) for f in FILES]
    parser = RecordParser()
    full = [r for r in iter_records(paths, parser, ReadStats(), keep_continuations=True)
            if r.request_id == "r2" or "r2" in r.raw]
    monkeypatch.setattr(reader, "_CHUNK", chunk)
    stats = ReadStats()
    kept = [r for r in iter_records(paths, parser, stats, keep_continuations=True,
                                    needle=b"r2")
            if r.request_id == "r2" or "r2" in r.raw]
    assert kept == full
    assert any(isinstance(tb := r.fields.get("traceback"), list) and len(tb) == 4 for r in kept)
    text = b"".join(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
                    for p in paths)
    assert stats.lines == text.count(b"\n")


def test_histogram_extend_equals_adding_one_by_one() -> None:
    rnd = random.Random(5)
    for values in ([rnd.lognormvariate(5, 1) for _ in range(6000)], [3.0, 0.0, -1.0, 7.5]):
        one, many = LogHistogram(), LogHistogram()
        for value in values:
            one.add(value)
        many.extend(values)
        assert (one.count, one.total, one.min, one.max, one.buckets, one.values) == \
            (many.count, many.total, many.min, many.max, many.buckets, many.values)


@pytest.mark.parametrize(("value", "expected"), [
    (5, 5.0), (2.5, 2.5), (-1, -1.0), (True, None), ("5", None), (None, None),
    (math.inf, None), (math.nan, None), (10**400, None)])
def test_only_finite_numbers_are_durations(value: object, expected: float | None) -> None:
    assert as_duration(value) == expected


# --- damaged input: report what can be read, warn where it stopped ------------------------


def synthesis_lines(start: int, count: int) -> bytes:
    """JSON synthesis_complete lines, one a second from 10:00:00 + ``start``."""
    return "".join(
        json.dumps({"time": f"2026-11-22T10:{(start + i) // 60 % 60:02d}:{(start + i) % 60:02d}"
                            "+00:00", "level": "INFO", "event": "synthesis_complete",
                    "request_id": f"q{start + i}", "status": "success",
                    "duration_ms": 100 + (start + i) % 900, "text_len": 20}) + "\n"
        for i in range(count)).encode()


def readable_lines(data: bytes) -> int:
    """Whole lines zlib can give back from (possibly damaged) gzip data."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    text = b""
    with contextlib.suppress(zlib.error):
        for at in range(0, len(data), 64):
            text += inflate.decompress(data[at:at + 64])
    return text.count(b"\n")


@pytest.fixture
def rotated(tmp_path: Path) -> list[Path]:
    """app.log.3.gz (oldest), app.log.2.gz, app.log.1, app.log: 400 lines each."""
    paths = []
    for n, name in enumerate(["app.log.3.gz", "app.log.2.gz", "app.log.1", "app.log"]):
        data = synthesis_lines(n * 400, 400)
        path = tmp_path / name
        path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
        paths.append(path)
    return paths


def report_of(result: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", ["1", "3"])
def test_a_truncated_gz_is_reported_up_to_the_cut_with_a_warning(
        rotated: list[Path], jobs: str) -> None:
    cut = rotated[1]
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) * 3 // 5])
    whole = readable_lines(cut.read_bytes())
    assert 0 < whole < 400
    result = _cli("--json", "--jobs", jobs, *map(str, rotated))
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["input"]["lines"] == 3 * 400 + whole
    assert report["syntheses"]["total"] == 3 * 400 + whole
    assert report["input"]["damaged"] == [
        {"file": str(cut), "line": whole, "offset": len(synthesis_lines(400, whole)),
         "reason": f"cut short: its {len(cut.read_bytes()):,} compressed bytes end inside "
                   "the gzip stream"}]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert str(cut) in warnings[0]
    assert "cut short" in warnings[0]
    assert f"line {whole:,}" in warnings[0]
    assert "Traceback" not in result.stderr
    strict = _cli("--json", "--strict", "--jobs", jobs, *map(str, rotated))
    assert strict.returncode == 2
    assert report_of(strict) == report


@pytest.mark.slow
def test_a_gz_corrupt_in_the_middle_keeps_the_text_before_the_damage(
        rotated: list[Path]) -> None:
    bad = rotated[0]
    data = bytearray(bad.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(16)  # zeroes over the middle of the deflate stream
    bad.write_bytes(bytes(data))
    result = _cli("--json", *map(str, rotated))
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    [damage] = report["input"]["damaged"]
    assert damage["file"] == str(bad)
    assert damage["reason"].startswith("corrupt near compressed")
    assert damage["line"] < 400
    assert report["input"]["lines"] >= 3 * 400 + damage["line"]
    assert "NOT READ WHOLE" in _cli(*map(str, rotated)).stdout
    assert _cli("--strict", *map(str, rotated)).returncode == 2


@pytest.mark.slow
def test_an_unreadable_file_is_skipped_with_a_warning(
        rotated: list[Path], permissions_apply: list[str]) -> None:
    locked = rotated[2]
    locked.chmod(0)
    try:
        result = _cli("--json", *map(str, rotated), prefix=tuple(permissions_apply))
        strict = _cli("--strict", *map(str, rotated), prefix=tuple(permissions_apply))
    finally:
        locked.chmod(0o644)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["input"]["lines"] == 3 * 400
    assert report["input"]["damaged"] == [{"file": str(locked), "line": 0, "offset": 0,
                                           "reason": "cannot be read (Permission denied)"}]
    assert f"warning: {locked}: cannot be read (Permission denied)" in result.stderr
    assert strict.returncode == 2
    assert "Syntheses: 1200" in strict.stdout


@pytest.mark.slow
def test_a_vanished_file_is_skipped_with_a_warning(rotated: list[Path]) -> None:
    gone = rotated[0].with_name("app.log.4.gz")
    result = _cli("--json", str(gone), *map(str, rotated))
    assert result.returncode == 0, result.stderr
    assert report_of(result)["input"]["lines"] == 4 * 400
    assert f"warning: {gone}: no such file" in result.stderr
    assert _cli("--strict", str(gone), *map(str, rotated)).returncode == 2


def test_a_file_vanishing_while_others_are_read_ends_only_that_file(
        rotated: list[Path]) -> None:
    stats = ReadStats()
    records = iter_records(rotated, RecordParser(), stats)
    first = [next(records) for _ in range(10)]
    rotated[3].unlink()  # not opened yet: it goes while the run is under way
    rest = list(records)
    assert len(first) + len(rest) == 3 * 400
    [damage] = stats.damaged
    assert (damage.file, damage.line, damage.offset) == (str(rotated[3]), 0, 0)
    assert damage.reason == "cannot be read (No such file or directory)"


@pytest.mark.slow
def test_indextts_text_gives_its_length_to_the_report(tmp_path: Path,
                                                     indextts_lines: bytes) -> None:
    """Issue 18 finding 2: a start with text= and no text_len (IndexTTS) puts its failure in
    the right length bucket, on the compiled path and the parser's alike."""
    log = tmp_path / "indextts.log"
    log.write_bytes(indextts_lines + "2024-06-12 14:27:00,000 - app.tts_engine - INFO - "
                    "synthesis_start: id=ts_fail, text=\"{}\"\n"
                    "2024-06-12 14:27:01,000 - app.tts_engine - ERROR - synthesis_complete: "
                    "id=ts_fail, status=failed, error_code=SCIPY_FFT_INVALID, duration_ms=9\n"
                    .format("字" * 2048).encode())
    for mode in ((), ("--no-fast",)):
        result = _cli("--json", *mode, str(log))
        assert result.returncode == 0, result.stderr
        lengths = json.loads(result.stdout)["failures_by_text_length"]
        assert {b["bucket"]: (b["total"], b["failed"]) for b in lengths} == {
            "0-64": (1, 0), "2048": (1, 1)}, mode
        assert "今天" not in result.stdout


@pytest.mark.slow
def test_id_joins_the_gateway_line_with_the_apps(tmp_path: Path) -> None:
    """Issue 18 finding 1: `analyze --id` over the app's log and nginx's access log."""
    app = tmp_path / "app.log"
    app.write_text(json.dumps({"time": "2026-11-22T10:00:01.100+00:00", "level": "INFO",
                               "event": "synthesis_complete", "request_id": "4f1c",
                               "status": "success", "duration_ms": 290}) + "\n")
    gateway = tmp_path / "gateway.access.log"
    gateway.write_text(json.dumps({
        "event": "gateway_request", "time": "2026-11-22T10:00:02+00:00", "request_id": "4f1c",
        "method": "POST", "uri": "/v1/tts", "status": "200", "upstream_status": "200",
        "request_time": "0.320", "upstream_response_time": "0.300"}) + "\n")
    result = _cli("--json", "--id", "4f1c", str(app), str(gateway))
    assert result.returncode == 0, result.stderr
    timeline = json.loads(result.stdout)
    assert [r["event"] for r in timeline["records"]] == ["synthesis_complete",
                                                         "gateway_request"]
    assert timeline["records"][1]["fields"]["request_time"] == "0.320"


# --- issue 18 finding 3: analyze finds the rejections ---------------------------------------

GATE = GOLDEN / "gate"
GATE_FILES = [str(GATE / "app.log"), str(GATE / "gateway.access.log")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--no-fast",), ("--jobs", "2")])
def test_gate_closure_report_matches_golden(mode: tuple[str, ...]) -> None:
    """A 3.5-minute gate closure: 84 INGRESS_CLOSED rejections by code and by minute, the
    cache warning, the gateway's codes (503 while closed, 502 while the app restarts, a 499);
    the compiled scanner, the parser and parallel workers agree."""
    result = _cli("--json", *mode, *GATE_FILES)
    assert result.returncode == 0, result.stderr
    data = _basenames(json.loads(result.stdout))
    assert data == _golden("gate/expected_report.json")
    codes = {(r["level"], r["code"]): r["count"] for r in data["records_by_code"]}
    assert codes[("WARNING", "INGRESS_CLOSED")] == 84
    assert codes[("WARNING", "CACHE_DIR_USAGE_HIGH")] == 1
    assert sum(m["rejected"] for m in data["per_minute"]) == 84
    gateway = {(g["code"], g["upstream_code"]): g["count"] for g in data["gateway"]["by_code"]}
    assert gateway[("502", "502")] == 2
    assert gateway[("499", "none")] == 1
    assert all(s["duration_ms"] > 0 for s in data["slowest"])


@pytest.mark.slow
def test_human_report_shows_rejections_minutes_and_gateway_codes() -> None:
    out = _cli(*GATE_FILES).stdout
    lines = out.splitlines()
    assert any(line.split()[:3] == ["WARNING", "INGRESS_CLOSED", "84"] for line in lines)
    assert any(line.split()[1:4] == ["0", "24", "24"] for line in lines)   # a closed minute
    assert "Gateway status codes (195 requests)" in out


def _ids_in_log(code: str, since: str, until: str) -> list[str]:
    ids = []
    for line in (GATE / "app.log").read_text().splitlines():
        record = json.loads(line)
        if record.get("warning_code") == code and since <= record["time"] < until:
            ids.append(record["request_id"])
    return ids


@pytest.mark.slow
def test_ids_lists_the_request_ids_of_a_code_in_a_window() -> None:
    result = _cli("--ids", "INGRESS_CLOSED", "--since", "2026-11-22T10:03:00+00:00",
                  "--until", "2026-11-22T10:04:00+00:00", *GATE_FILES)
    assert result.returncode == 0, result.stderr
    expected = _ids_in_log("INGRESS_CLOSED", "2026-11-22T10:03:00", "2026-11-22T10:04:00")
    assert result.stdout.split() == expected
    assert len(expected) == 24
    # the gateway's own codes: requests the app never logged
    result = _cli("--json", "--ids", "502", *GATE_FILES)
    assert json.loads(result.stdout) == {"code": "502", "request_ids": ["n-502a", "n-502b"]}
    assert _cli("--ids", "NO_SUCH_CODE", *GATE_FILES).returncode == 1


@pytest.mark.slow
def test_cache_hits_are_not_among_the_slowest(tmp_path: Path) -> None:
    """0.0 ms rows (cache hits) once filled the slowest table of a log of mostly hits."""
    log = tmp_path / "app.log"
    log.write_text("".join(json.dumps({
        "time": f"2026-11-22T10:00:0{i}.000+00:00", "level": "INFO", "logger": "a",
        "event": "synthesis_complete", "request_id": f"r{i}", "status": "success",
        "duration_ms": 0.0 if i else 700.0, "cache_hit": bool(i)}) + "\n" for i in range(5)))
    for mode in ((), ("--no-fast",)):
        data = json.loads(_cli("--json", *mode, str(log)).stdout)
        assert data["slowest"] == [{"request_id": "r0", "duration_ms": 700.0}]
        assert data["syntheses"]["total"] == 5
