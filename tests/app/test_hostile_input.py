"""Hostile bodies and gate files, through real HTTP: every answer is a 4xx JSON error with its
code, never a 500; a gate file that does not parse or validate keeps the last good state."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.app.conftest import StartApp, expect_error, post_head, raw_http, write_gate
from tts_app.validation import MAX_DEPTH

ROUTES = ("/v1/tts", "/v1/tts/jobs")


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def with_text(value: bytes) -> bytes:
    return b'{"text": ' + value + b"}"


HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("open brackets", b"[" * 60000, "BAD_REQUEST"),
    ("deep array", nested(30000), "BAD_REQUEST"),
    ("deep text", with_text(nested(30000)), "BAD_REQUEST"),
    ("deep objects", b'{"a":' * 10000 + b"1" + b"}" * 10000, "BAD_REQUEST"),
    ("one level past the bound", with_text(nested(MAX_DEPTH)), "BAD_REQUEST"),
    ("invalid UTF-8", b'{"text": "caf\xc3\x28 \xff"}', "BAD_REQUEST"),
    ("UTF-8 BOM garbage", b"\xef\xbb\xbf\xfe\xff", "BAD_REQUEST"),
    ("empty body", b"", "BAD_REQUEST"),
    ("null", b"null", "BAD_REQUEST"),
    ("a string", b'"text"', "BAD_REQUEST"),
    ("a number", b"42", "BAD_REQUEST"),
    ("NaN", b'{"text": "hi", "params": {"temperature": NaN}}', "BAD_REQUEST"),
    ("Infinity", b'{"text": "hi", "params": {"speed": Infinity}}', "BAD_REQUEST"),
    ("-Infinity", b'{"text": "hi", "params": {"top_p": -Infinity}}', "BAD_REQUEST"),
    ("1e999", b'{"text": "hi", "params": {"temperature": 1e999}}', "BAD_REQUEST"),
    ("5000-digit integer", b'{"text": "hi", "params": {"seed": ' + b"9" * 5000 + b"}}",
     "BAD_REQUEST"),
    ("4000-digit integer", b'{"text": "hi", "params": {"seed": ' + b"9" * 4000 + b"}}",
     "BAD_REQUEST"),
    ("huge text", with_text(b'"' + b"a" * 60000 + b'"'), "TEXT_TOO_LONG"),
    ("huge voice", b'{"text": "hi", "voice": "' + b"v" * 60000 + b'"}', "VOICE_UNKNOWN"),
    ("huge field name", b'{"text": "hi", "' + b"k" * 60000 + b'": 1}', "BAD_REQUEST"),
    ("thousands of fields", b"{" + b",".join(b'"k%d": %d' % (i, i) for i in range(3000))
     + b"}", "BAD_REQUEST"),
    ("body over the limit, no text", b" " * 70000, "BODY_TOO_LARGE"),
    ("body over the limit with text", with_text(b'"' + b"a" * 70000 + b'"'), "BODY_TOO_LARGE"),
]

# each a value of the wrong JSON type for the field it is sent in
NOT_TEXT: tuple[object, ...] = ([1], {}, True, 1.5, 7, [[["deep"]]])
NOT_STRING: tuple[object, ...] = (1, [], {}, True)
NOT_BOOL: tuple[object, ...] = (1, "true", [], {})
NOT_OBJECT: tuple[object, ...] = ([], "x", 5, True)
NOT_PARAM: tuple[object, ...] = ("hot", True, [], {}, -1, 10**30)

WRONG_TYPES: list[dict[str, object]] = [
    {"text": value} for value in NOT_TEXT
] + [
    {"text": "hi", name: value}
    for name in ("voice", "lang", "format")
    for value in NOT_STRING
] + [
    {"text": "hi", "stream": value} for value in NOT_BOOL
] + [
    {"text": "hi", "params": value} for value in NOT_OBJECT
] + [
    {"text": "hi", "params": {name: value}}
    for name in ("temperature", "top_p", "top_k", "speed", "seed")
    for value in NOT_PARAM
] + [
    {"text": "hi", "params": {"top_k": 1.5}}, {"text": "hi", "params": {"seed": 2.5}},
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("body", "code"), [(b, c) for _n, b, c in HOSTILE_BODIES],
                         ids=[n for n, _b, _c in HOSTILE_BODIES])
async def test_hostile_body_is_a_4xx_json_error(start_app: StartApp, route: str, body: bytes,
                                                code: str) -> None:
    app = await start_app()
    await expect_error(await app.client.post(route, data=body), code)
    assert app.records("unhandled_exception") == []


@pytest.mark.parametrize("route", ROUTES)
async def test_every_field_of_the_wrong_type_is_400(start_app: StartApp, route: str) -> None:
    app = await start_app()
    for payload in WRONG_TYPES:
        body = await expect_error(await app.client.post(route, json=payload), "BAD_REQUEST")
        assert body["error"]["message"] != "body is not valid JSON", payload
    assert len(app.records("request_rejected")) == len(WRONG_TYPES)
    assert app.records("unhandled_exception") == []


async def test_bodies_within_the_depth_bound_still_parse(start_app: StartApp) -> None:
    app = await start_app()
    ok = await app.client.post("/v1/tts", data=b'{"text": "Brackets [[[[[[[[[[]]]]]]]]]] '
                                                b'and {{{{{{{{{{ are fine in text.",'
                                                b' "params": {"seed": 3}}')
    assert ok.status == 200, await ok.text()
    await expect_error(await app.client.post("/v1/tts", data=with_text(nested(MAX_DEPTH - 1))),
                       "BAD_REQUEST")     # deep enough to parse: refused as a wrong type


@pytest.mark.parametrize(("name", "head_extra", "body", "code"), [
    ("gzip that is not gzip", "Content-Encoding: gzip\r\n", b"not gzip at all", "BAD_REQUEST"),
    ("deflate that is not deflate", "Content-Encoding: deflate\r\n", b"xxxx", "BAD_REQUEST"),
    ("gzip bomb", "Content-Encoding: gzip\r\n", gzip.compress(b" " * 10_000_000),
     "BODY_TOO_LARGE"),
])
async def test_broken_content_encoding_is_a_4xx_json_error(
        start_app: StartApp, name: str, head_extra: str, body: bytes, code: str) -> None:
    app = await start_app()
    for route in ROUTES:
        response = await raw_http(app.port, post_head(route, len(body), head_extra) + body)
        assert response is not None, name
        assert response.status == 400 if code == "BAD_REQUEST" else 413
        assert response.json()["error"]["code"] == code
    assert app.records("unhandled_exception") == []


async def test_broken_chunking_after_the_head_ends_at_the_body_deadline(
        start_app: StartApp) -> None:
    # aiohttp queues the framing error as a next message and never completes this body, so
    # the body deadline is what answers it: a 408 JSON error, not a handler held for good.
    app = await start_app({"server": {"body_timeout_s": 0.5}})
    response = await raw_http(app.port, post_head("/v1/tts"), b"5\r\n{\"tex\r\n",
                              b"ZZ\r\nbroken\r\n0\r\n\r\n", pause_s=0.2)
    assert response is not None
    assert response.status == 408
    assert response.json()["error"]["code"] == "REQUEST_TIMEOUT"
    assert app.records("unhandled_exception") == []


def write_raw(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


GOOD_CLOSED = json.dumps({"open": False, "reasons": ["vram_high"], "since": 1.0,
                          "retry_after_s": 7})
BAD_GATE_FILES = [
    GOOD_CLOSED.replace("7}", "1e999}"),
    GOOD_CLOSED.replace("7}", "-3}"),
    GOOD_CLOSED.replace("7}", "7.5}"),
    GOOD_CLOSED.replace("7}", "NaN}"),
    GOOD_CLOSED.replace("7}", "true}"),
    '{"open": ' + "[" * 60000 + "]" * 60000 + "}",
    "[" * 60000,
    '{"open": "no"}',
    '{"open": true, "reasons": "vram"}',
    '{"open": true, "reasons": ["vram", 7]}',
    "",
    "\xff\xfe",
]


@pytest.mark.parametrize("bad", BAD_GATE_FILES, ids=range(len(BAD_GATE_FILES)))
async def test_bad_gate_file_keeps_the_last_good_state_and_is_logged_once(
        start_app: StartApp, bad: str) -> None:
    app = await start_app()
    write_raw(app.gate_file, GOOD_CLOSED)
    for _ in range(2):
        closed = await app.client.post("/v1/tts", json={"text": "Blocked."})
        await expect_error(closed, "INGRESS_CLOSED")
        assert closed.headers["Retry-After"] == "7"
    write_raw(app.gate_file, bad)
    for _ in range(5):           # every answer is the last good state, never a 500
        still = await app.client.post("/v1/tts", json={"text": "Blocked."})
        await expect_error(still, "INGRESS_CLOSED")
        assert still.headers["Retry-After"] == "7"
        assert (await app.client.get("/status")).status == 200
    invalid = app.records("gate_file_invalid")
    assert len(invalid) == 1
    assert invalid[0]["warning_code"] == "GATE_FILE_INVALID"
    write_gate(app.gate_file, is_open=True)        # a good file ends the episode
    assert (await app.client.post("/v1/tts", json={"text": "Open again."})).status == 200
    write_raw(app.gate_file, bad)
    assert (await app.client.post("/v1/tts", json={"text": "Still open."})).status == 200
    assert len(app.records("gate_file_invalid")) == 2
    assert app.records("unhandled_exception") == []


async def test_gate_file_values_beyond_their_bounds_are_cut_down(start_app: StartApp) -> None:
    app = await start_app()
    write_raw(app.gate_file, json.dumps({
        "open": False, "since": 1.0, "retry_after_s": 10**12,
        "reasons": [f"alert_{i}_" + "x" * 300 for i in range(100)]}))
    closed = await app.client.post("/v1/tts", json={"text": "Blocked."})
    body = await expect_error(closed, "INGRESS_CLOSED")
    assert closed.headers["Retry-After"] == "3600"
    assert app.state.gate.current().reasons[:2] == ("alert_0_" + "x" * 192,
                                                     "alert_1_" + "x" * 192)
    assert len(app.state.gate.current().reasons) == 32
    assert len(body["error"]["message"]) < 8000
    assert app.records("gate_file_invalid") == []
