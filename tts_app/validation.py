"""Turn a request body into a validated :class:`TtsSpec`, or an AppError with its code.

Checks run cheapest first and in the order a client fixes them: shape, emptiness, length,
characters, voice/language, parameters.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from tts_app.backends.base import SynthesisParams
from tts_app.errors import AppError

# C0/C1 controls except tab/newline/CR, lone surrogates, private use, U+FFFD replacement
# (a sign of a broken upstream decode), noncharacters, and bidi overrides (text spoofing).
_INVALID = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ue000-\uf8ff"
    "\ufffd\ufffe\uffff\u202a-\u202e\u2066-\u2069]")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
FORMATS = ("wav", "pcm")
_FIELDS = frozenset(("text", "voice", "lang", "format", "stream", "params"))
_PARAM_RANGES: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0), "top_p": (float, 0.0, 1.0),
    "top_k": (int, 1, 1000), "speed": (float, 0.25, 4.0), "seed": (int, 0, 2**32 - 1)}


@dataclass(frozen=True, slots=True)
class TtsSpec:
    text: str
    voice: str
    lang: str
    format: str
    stream: bool
    params: SynthesisParams
    canonical: str          # normalized request, for Idempotency-Key comparison


# A TTS request nests two levels ({"params": {...}}); json's parser recurses per level and
# raises RecursionError near 1000, so deeper bodies are refused before it runs.
MAX_DEPTH = 8
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_TOO_MANY_OPENERS = b"[" * (MAX_DEPTH + 1)


def _nesting_problem(raw: bytes) -> str | None:
    """Why ``raw`` is refused before parsing, if it is. Only bytes operations, linear in the
    (size-capped) body: drop escaped backslashes and quotes, keep what lies outside strings,
    keep its brackets; then any run of MAX_DEPTH + 1 openers, or innermost pairs deleted once
    per level more than MAX_DEPTH times, is too deep."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return None
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    if _TOO_MANY_OPENERS in brackets.translate(_AS_SQUARE):
        return f"it nests deeper than {MAX_DEPTH} levels"
    for _ in range(MAX_DEPTH):
        if not brackets:
            return None
        inner = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if inner == brackets:
            return "its brackets do not match"
        brackets = inner
    return f"it nests deeper than {MAX_DEPTH} levels" if brackets else None


def _refuse_constant(name: str) -> Any:
    raise AppError("BAD_REQUEST", f"body is not valid JSON: {name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise AppError("BAD_REQUEST", f"body is not valid JSON: {text[:20]} is out of range")
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    problem = _nesting_problem(raw)
    if problem:
        raise AppError("BAD_REQUEST", f"body is not valid JSON: {problem}")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError):
        raise AppError("BAD_REQUEST", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise AppError("BAD_REQUEST", "body must be a JSON object")
    return data


def validate(data: dict[str, Any], max_chars: int, voices: Collection[str],
             languages: Collection[str]) -> TtsSpec:
    unknown = set(data) - _FIELDS
    if unknown:
        raise AppError("BAD_REQUEST", f"unknown field {sorted(unknown)[0]!r}; expected "
                                      f"{', '.join(sorted(_FIELDS))}")
    text = data.get("text")
    if text is None or not isinstance(text, str):
        raise AppError("BAD_REQUEST" if text is not None else "TEXT_EMPTY",
                       "text must be a string" if text is not None else "text is missing")
    # Whitespace and Unicode normalization make "same text, different spacing" one cache entry.
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not any(map(_speakable, text)):
        raise AppError("TEXT_EMPTY", "text has nothing to speak (only spaces, format or "
                                     "control characters)" if text else None)
    if len(text) > max_chars:
        raise AppError("TEXT_TOO_LONG", f"text has {len(text)} characters; the limit is "
                                        f"{max_chars}")
    bad = _INVALID.search(text)
    if bad:
        raise AppError("TEXT_INVALID_CHARS",
                       f"invalid character U+{ord(bad.group()):04X} at position {bad.start()}")
    voice = _string(data, "voice", "default")
    # Without an explicit lang, Han characters mean Mandarin: a default "en" would spell them.
    lang = _string(data, "lang", "zh" if _HAN.search(text) else "en")
    fmt = _string(data, "format", "wav")
    if fmt not in FORMATS:
        raise AppError("BAD_REQUEST", f"format must be one of {', '.join(FORMATS)}")
    if lang not in languages:
        raise AppError("LANG_UNSUPPORTED", f"lang {lang!r} is not supported; expected one of "
                                           f"{', '.join(sorted(languages))}")
    if voice not in voices:
        raise AppError("VOICE_UNKNOWN", f"voice {voice!r} is unknown; expected one of "
                                        f"{', '.join(sorted(voices))}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise AppError("BAD_REQUEST", "stream must be true or false")
    params = _params(data.get("params"))
    canonical = json.dumps([text, voice, lang, fmt, stream, params.seed, params.temperature,
                            params.top_p, params.top_k, params.speed], ensure_ascii=False)
    return TtsSpec(text, voice, lang, fmt, stream, params, canonical)


def _speakable(char: str) -> bool:
    """Letters, digits, punctuation, symbols; not controls, format characters (zero-width
    spaces, direction marks), separators or lone combining marks, which render as nothing."""
    return unicodedata.category(char)[0] not in "CZM"


def _string(data: dict[str, Any], name: str, default: str) -> str:
    value = data.get(name, default)
    if not isinstance(value, str):
        raise AppError("BAD_REQUEST", f"{name} must be a string")
    return value


def _params(value: Any) -> SynthesisParams:
    if value is None:
        return SynthesisParams()
    if not isinstance(value, dict):
        raise AppError("BAD_REQUEST", "params must be an object")
    out: dict[str, Any] = {}
    for name, raw in value.items():
        if name not in _PARAM_RANGES:
            raise AppError("BAD_REQUEST", f"unknown param {name!r}; expected "
                                          f"{', '.join(sorted(_PARAM_RANGES))}")
        kind, low, high = _PARAM_RANGES[name]
        ok_type = isinstance(raw, int) if kind is int else isinstance(raw, (int, float))
        if isinstance(raw, bool) or not ok_type or not low <= raw <= high:
            raise AppError("BAD_REQUEST", f"params.{name} must be a {kind.__name__} in "
                                          f"[{low}, {high}]")
        out[name] = kind(raw)
    return SynthesisParams(**out)
