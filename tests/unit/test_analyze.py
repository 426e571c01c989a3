"""``tts-exporter analyze`` on crafted rotated logs (golden outputs) and generated ones."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import subprocess
import sys
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


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TZ": "UTC"}
    return subprocess.run([sys.executable, "-m", "exporter", "analyze", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def _golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def _basenames(data: dict) -> dict:
    if "input" in data:
        data["input"]["files"] = [Path(f).name for f in data["input"]["files"]]
    return data


def test_report_json_matches_golden() -> None:
    result = _cli("--json", *FILES)
    assert result.returncode == 0, result.stderr
    assert _basenames(json.loads(result.stdout)) == _golden("expected_report.json")


def test_report_window_matches_golden() -> None:
    result = _cli("--json", "--since", "2026-11-22T10:00:03+00:00",
                  "--until", "2026-11-22 10:00:06", *FILES)
    assert result.returncode == 0, result.stderr
    data = _basenames(json.loads(result.stdout))
    assert data == _golden("expected_report_window.json")
    # r2's start lies before the window, its failure inside: the length still comes through
    assert {"bucket": "2048", "failed": 2, "failure_ratio": 1.0, "top_error": "SCIPY_FFT_INVALID",
            "top_error_share": 1.0, "total": 2} in data["failures_by_text_length"]


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
    assert data["status"] == "failed" and data["span_ms"] == 1130.0


def test_human_report_key_lines() -> None:
    result = _cli(*FILES)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert any(line.split()[:4] == ["2048", "2", "2", "100.0%"]
               and "SCIPY_FFT_INVALID (100%)" in line for line in lines)
    assert "malformed lines: 1" in out
    assert "failure ratio 50.00%" in out
    assert "P50=600.0 P95=5000.0 P99=5000.0" in out and "(exact)" in out
    assert lines[lines.index("Slowest syntheses") + 3].split() == ["r6", "5000.0"]


def test_human_timeline_shows_traceback_and_offsets() -> None:
    out = _cli("--id", "r2", *FILES).stdout
    assert "Request r2: failed" in out
    assert "| ValueError: invalid number of data points (0) specified" in out
    assert "+1120ms  ERROR    synthesis_complete" in out


def test_unknown_id_and_missing_file_fail_cleanly() -> None:
    unknown = _cli("--id", "nope", *FILES)
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    missing = _cli("/nonexistent/app.log")
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_progress_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--progress", *FILES]) == 0
    assert "analyze:" in capsys.readouterr().err
    assert main(["analyze", *FILES]) == 0          # stderr is not a TTY here
    assert capsys.readouterr().err == ""


def test_check_config_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "exporter.yaml"
    assert main(["check-config", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


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
    assert not hist.exact and len(hist.buckets) < 1000
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[math.ceil(q * len(values)) - 1]
        estimate = hist.quantile(q)
        assert estimate is not None and abs(estimate - exact) / exact < 0.011
    small = LogHistogram()
    for v in range(1, EXACT_CAP):
        small.add(float(v))
    assert small.exact and small.quantile(0.5) == EXACT_CAP // 2


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
    assert any(len(r.fields.get("traceback", [])) == 4 for r in kept)
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
