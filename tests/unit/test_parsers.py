"""The log contract's two formats, the seed forms, and arbitrary bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import AliasConfig
from exporter.logs.parsers import MalformedLine, Record, RecordParser

SEED = (b"2024-06-12 14:22:38,415 - app.tts_engine - INFO - synthesis_complete: id=ts_7f3a2b1c, "
        b"status=success, duration_ms=523, audio_size_kb=124, cache_saved=true, "
        b"model_stage=llm_postproc")


def parse(line: bytes, aliases: AliasConfig | None = None) -> Record:
    record = RecordParser(aliases).parse(line)
    assert record is not None
    return record


def test_indextts_text_line_gives_typed_canonical_fields() -> None:
    record = parse(SEED + b"\n")
    assert record.level == "INFO"
    assert record.logger == "app.tts_engine"
    assert record.event == "synthesis_complete"
    assert record.request_id == "ts_7f3a2b1c"
    assert record.fields["duration_ms"] == 523
    assert record.fields["cache_saved"] is True
    assert record.fields["model_stage"] == "llm_postproc"
    expected = time.mktime((2024, 6, 12, 14, 22, 38, 0, 0, -1)) + 0.415
    assert record.time == pytest.approx(expected)


def test_quoted_values_keep_commas_and_equals_and_cjk() -> None:
    line = ('2024-06-12 14:22:38,415 - app - INFO - synthesis_start: id=a1, '
            'text="今天天气真好, a=b", lang=zh, text_len=6 chars').encode()
    record = parse(line)
    assert record.fields["text"] == "今天天气真好, a=b"
    assert record.fields["lang"] == "zh"
    assert record.fields["text_len"] == 6


@pytest.mark.parametrize(("raw", "value"), [("86 chars", 86), ("1 char", 1), ("0.5", 0.5)])
def test_units_are_dropped_from_numbers(raw: str, value: float) -> None:
    line = f"2024-06-12 14:22:38,415 - app - INFO - synthesis_start: id=a1, text_len={raw}"
    assert parse(line.encode()).fields["text_len"] == value


def test_a_number_longer_than_int_reads_stays_text() -> None:
    """Python's int() refuses more than 4,300 digits; the value is kept as written."""
    digits = "1" * 4301
    line = f"2024-06-12 14:22:38,415 - app - INFO - http_request: n={digits}"
    assert parse(line.encode()).fields["n"] == digits


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:30+01:00", "2026-13-01T00:00:00",
                                   "not a time"])
def test_json_times_that_do_not_convert_have_no_time(stamp: str) -> None:
    line = f'{{"time": "{stamp}", "level": "INFO", "event": "http_request"}}'
    assert parse(line.encode()).time is None


def test_free_form_error_line_is_a_record_without_event() -> None:
    line = (b"2024-06-12 14:22:39,001 - app.tts_engine - ERROR - ERROR: scipy.fft failed on "
            b"input len=1024, exc=RuntimeWarning: invalid value")
    record = parse(line)
    assert record.level == "ERROR"
    assert record.event == ""
    assert record.message.startswith("ERROR: scipy.fft failed")


def test_crlf_is_stripped() -> None:
    assert parse(SEED + b"\r\n").fields["model_stage"] == "llm_postproc"


def test_json_line_with_aliases_and_level_normalised() -> None:
    line = (b'{"time": "2026-11-22T14:22:38.415+00:00", "level": "warn", "logger": "x", '
            b'"event": "infer_start", "task_id": "t9", "text_length": 12}')
    record = parse(line)
    assert record.level == "WARNING"
    assert record.event == "synthesis_start"
    assert record.request_id == "t9"
    assert record.fields["text_len"] == 12
    assert record.time == pytest.approx(1795357358.415)


def test_configured_aliases_replace_defaults() -> None:
    aliases = AliasConfig(fields={"id": ["job"]}, events={"tts_done": "synthesis_complete"})
    record = parse(b'{"event": "tts_done", "job": "j1"}', aliases)
    assert (record.event, record.request_id) == ("synthesis_complete", "j1")


@pytest.mark.parametrize("line", [b"Traceback (most recent call last):",
                                  b'  File "x.py", line 3, in f', b"", b"   ", b"\r\n"])
def test_continuation_and_blank_lines_start_no_record(line: bytes) -> None:
    assert RecordParser().parse(line) is None


@pytest.mark.parametrize("line", [b"{not json", b'{"a": 1', b"{\xff}"])
def test_broken_json_is_malformed(line: bytes) -> None:
    with pytest.raises(MalformedLine):
        RecordParser().parse(line)


def test_json_scalar_that_starts_with_brace_is_never_accepted() -> None:
    with pytest.raises(MalformedLine):
        RecordParser().parse(b"{}}")


def verdict(parser: RecordParser, line: bytes) -> str:
    """What the parser makes of a line, comparable across parsers (repr: a NaN field too)."""
    try:
        return repr(parser.parse(line))
    except MalformedLine:
        return "malformed"


HEADED = st.builds("2024-06-12 14:22:{:02d},{:03d} - app - INFO - {}".format,
                   st.integers(0, 59), st.integers(0, 999), st.text(max_size=40))


@given(st.lists(st.one_of(st.binary(max_size=120), HEADED.map(str.encode)), max_size=20))
def test_any_line_gets_the_same_verdict_whatever_came_before(lines: list[bytes]) -> None:
    """Nothing but MalformedLine escapes, and the state the parser keeps between lines (its
    timestamp cache) never changes what a line parses to."""
    parser = RecordParser()
    for line in lines:
        assert verdict(parser, line) == verdict(RecordParser(), line)


@given(st.text(max_size=200))
def test_arbitrary_text_after_a_valid_header_keeps_the_headers_time_level_and_logger(
        body: str) -> None:
    line = f"2024-06-12 14:22:38,415 - app - INFO - {body}".encode()
    record = parse(line)
    assert record.time == pytest.approx(time.mktime((2024, 6, 12, 14, 22, 38, 0, 0, -1)) + 0.415)
    assert (record.level, record.logger) == ("INFO", "app")


def test_unquoted_pairs_with_loose_spacing_and_text_aliases() -> None:
    record = parse(b"2024-06-12 14:22:38,415 - eng - INFO - infer_done: request_id=ts_1 , "
                   b"result=success,elapsed_ms=7, text_len=86 chars \n")
    assert record.event == "synthesis_complete"
    assert record.request_id == "ts_1"
    assert record.fields == {"id": "ts_1", "status": "success", "duration_ms": 7,
                             "text_len": 86}


def test_quoted_and_unquoted_lines_parse_alike() -> None:
    plain = parse(b"2024-06-12 14:22:38,415 - eng - INFO - stage_time: id=a, stage=x, "
                  b"duration_ms=12.5")
    quoted = parse(b"2024-06-12 14:22:38,415 - eng - INFO - stage_time: id=\"a\", stage='x', "
                   b"duration_ms=12.5")
    assert plain.fields == quoted.fields == {"id": "a", "stage": "x", "duration_ms": 12.5}


def test_of_two_aliases_of_one_field_the_first_in_the_line_wins_whatever_the_hash_seed() -> None:
    """Both formats; each order; in processes with different string hash seeds (the choice
    was once a set's iteration order, so the same line gave different ids run to run)."""
    script = (
        "from exporter.logs.parsers import RecordParser\n"
        "p = RecordParser()\n"
        "for line in ('2026-11-22 10:00:01,250 - app - INFO - stage_time: task_id=a, "
        "request_id=b', '2026-11-22 10:00:01,250 - app - INFO - stage_time: request_id=b, "
        "task_id=a', '{\"event\": \"stage_time\", \"task_id\": \"a\", \"request_id\": \"b\"}', "
        "'{\"event\": \"stage_time\", \"request_id\": \"b\", \"task_id\": \"a\"}'):\n"
        "    print(p.fields(line)[2]['id'])\n")
    for seed in range(8):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)})
        assert out.stdout.split() == ["a", "b", "a", "b"], seed
