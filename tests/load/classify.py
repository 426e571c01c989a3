"""What a load-test response counts as: success, rejected, shed or failed.

A 200 is not a success by itself: the body must be a valid PCM16 mono WAV whose length is
plausible for the text and whose energy is above the silence floor (a 200 with an error body,
an empty or silent WAV are the classic ways a load test lies). Shed and failed follow the
error code in the JSON body, checked against its status: only 429 QUEUE_FULL/RATE_LIMITED
and 503 INGRESS_CLOSED/SHUTTING_DOWN are shed; anything else that is not the expected answer
is failed. Kept free of locust (which patches the standard library on import) so pytest can
import it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tts_app.errors import ERRORS

Outcome = Literal["success", "rejected", "shed", "failed"]
SHED = frozenset({(429, "QUEUE_FULL"), (429, "RATE_LIMITED"), (503, "INGRESS_CLOSED"),
                  (503, "SHUTTING_DOWN")})
# The answers a malformed request may get: every 4xx of the app's error table except the
# shedding ones (tts_app/errors.py is the one place error codes live).
REJECTIONS = frozenset((spec.status, code) for code, spec in ERRORS.items()
                       if 400 <= spec.status < 500 and (spec.status, code) not in SHED)
SILENCE_RMS = 0.01            # about -40 dBFS; speech sits far above, dither and clicks below
MIN_S_PER_CHAR = 0.02         # faster than any speech (50 characters a second)
MAX_S_PER_CHAR = 0.3          # slower than any speech, plus a fixed allowance
MAX_EXTRA_S = 2.0
STREAM_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str


def error_code(body: bytes) -> str | None:
    """The ``error.code`` of the app's JSON error body, or None when the body is not one."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def wav_samples(body: bytes) -> np.ndarray | str:
    """The samples (float, [-1, 1]) of a PCM16 mono WAV, or what is wrong with it."""
    if len(body) < 44:
        return f"not a WAV: {len(body)} bytes"
    (riff, riff_size, wave, fmt, fmt_size, codec, channels, rate, _, _, bits, data,
     data_size) = struct.unpack("<4sI4s4sIHHIIHH4sI", body[:44])
    if (riff, wave, fmt, data) != (b"RIFF", b"WAVE", b"fmt ", b"data") or fmt_size != 16:
        return "not a WAV: bad RIFF/fmt/data header"
    if (codec, channels, bits) != (1, 1, 16) or rate <= 0:
        return f"not PCM16 mono: codec {codec}, {channels} channels, {bits} bits"
    payload = body[44:]
    if data_size != STREAM_SIZE and (data_size != len(payload) or riff_size != 36 + data_size):
        return f"WAV sizes disagree: header {data_size}, body {len(payload)}"
    if len(payload) % 2:
        return "WAV data is not whole samples"
    return np.frombuffer(payload, "<i2").astype(np.float32) / 32768


def classify_audio(status: int, body: bytes, text: str) -> Verdict:
    """A request that should have produced speech for ``text``."""
    if status != 200:
        return _error(status, body)
    samples = wav_samples(body)
    if isinstance(samples, str):
        return Verdict("failed", samples)
    rate = struct.unpack("<I", body[24:28])[0]
    seconds = samples.size / rate
    low, high = MIN_S_PER_CHAR * len(text), MAX_S_PER_CHAR * len(text) + MAX_EXTRA_S
    if not low <= seconds <= high:
        return Verdict("failed", f"{seconds:.2f} s of audio for {len(text)} characters "
                                 f"(plausible {low:.2f}-{high:.2f} s)")
    rms = float(np.sqrt(np.mean(samples ** 2))) if samples.size else 0.0
    if rms <= SILENCE_RMS:
        return Verdict("failed", f"silent: RMS {rms:.4f} <= {SILENCE_RMS}")
    return Verdict("success", f"{seconds:.2f} s, RMS {rms:.3f}")


def classify_rejection(status: int, body: bytes) -> Verdict:
    """A malformed request: the right answer is a 4xx naming what is wrong, never audio."""
    code = error_code(body)
    if (status, code) in REJECTIONS:
        return Verdict("rejected", f"{status} {code}")
    if status == 200:
        return Verdict("failed", "a malformed request was answered 200")
    return _error(status, body)


def classify_job_error(error: object) -> Verdict:
    """A job that ended ``failed``: its ``error`` object decides, as a response's would."""
    code = error.get("code") if isinstance(error, dict) else None
    if any(code == shed_code for _, shed_code in SHED):
        return Verdict("shed", f"job {code}")
    return Verdict("failed", f"job {code or 'failed without an error code'}")


def _error(status: int, body: bytes) -> Verdict:
    code = error_code(body)
    if (status, code) in SHED:
        return Verdict("shed", f"{status} {code}")
    return Verdict("failed", f"{status} {code or 'without an error code'}")
