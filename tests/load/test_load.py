"""The load test's judge (tests/load/classify.py) and the locustfile run headless for real."""

from __future__ import annotations

import io
import json
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.load.classify import classify_audio, classify_job_error, classify_rejection
from tests.load.run_load import locust_command, locust_environment
from tests.support.local_stack import Stack, StackOptions, wait_until

TEXT = "Hello, and welcome to the service."   # 34 characters: 0.68 s to 12.2 s is plausible
RATE = 22050


def wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def speech(seconds: float, amplitude: float = 0.1) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2)


def error(code: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": "x", "request_id": "r"}}).encode()


def test_a_plausible_audible_wav_is_a_success() -> None:
    assert classify_audio(200, wav(speech(2.0)), TEXT).outcome == "success"


@pytest.mark.parametrize(("body", "why"), [
    (wav(np.zeros(2 * RATE)), "silent"),
    (wav(speech(2.0, amplitude=0.005)), "silent"),           # dither-level energy
    (wav(speech(0.1)), "characters"),                         # far too short for the text
    (wav(speech(30.0)), "characters"),                        # far too long
    (wav(np.zeros(0)), "characters"),                         # a header and no audio
    (wav(speech(2.0))[:-101], "sizes disagree"),              # truncated body
    (b"", "not a WAV"),
    (error("MODEL_ERROR"), "not a WAV"),                      # 200 with an error body
    (b"RIFF" + bytes(40) + b"audio?", "not a WAV"),
])
def test_a_200_that_is_not_plausible_speech_is_a_failure(body: bytes, why: str) -> None:
    verdict = classify_audio(200, body, TEXT)
    assert verdict.outcome == "failed"
    assert why in verdict.reason


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (429, error("QUEUE_FULL"), "shed"), (429, error("RATE_LIMITED"), "shed"),
    (503, error("INGRESS_CLOSED"), "shed"), (503, error("SHUTTING_DOWN"), "shed"),
    (503, error("MODEL_ERROR"), "failed"), (503, error("GPU_OOM"), "failed"),
    (500, error("INTERNAL"), "failed"), (502, b"<html>bad gateway</html>", "failed"),
    (429, b"", "failed"),                              # the status alone never sheds
    (503, error("QUEUE_FULL"), "failed"),              # a code under the wrong status
    (422, error("VOICE_UNKNOWN"), "failed"),           # a valid request refused
])
def test_errors_are_shed_or_failed_by_their_code(status: int, body: bytes,
                                                 outcome: str) -> None:
    assert classify_audio(status, body, TEXT).outcome == outcome


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (400, error("BAD_REQUEST"), "rejected"), (422, error("TEXT_INVALID_CHARS"), "rejected"),
    (413, error("TEXT_TOO_LONG"), "rejected"), (200, wav(speech(2.0)), "failed"),
    (400, b"bad", "failed"), (500, error("INTERNAL"), "failed"),
    (429, error("RATE_LIMITED"), "shed"), (413, error("BODY_TOO_LARGE"), "rejected"),
    (408, error("REQUEST_TIMEOUT"), "rejected"), (503, error("BODY_TOO_LARGE"), "failed")])
def test_a_bad_request_is_never_a_success(status: int, body: bytes, outcome: str) -> None:
    assert classify_rejection(status, body).outcome == outcome


def test_a_failed_job_is_shed_or_failed_by_its_code() -> None:
    assert classify_job_error({"code": "SHUTTING_DOWN"}).outcome == "shed"
    assert classify_job_error({"code": "MODEL_ERROR"}).outcome == "failed"
    assert classify_job_error(None).outcome == "failed"


def run_locust(stack: Any, out: Path, seconds: int) -> dict[str, Any]:
    result = subprocess.run(locust_command(stack.url("app"), 4, 4, f"{seconds}s", out),
                            env=locust_environment(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


@pytest.mark.slow
def test_locustfile_headless_against_the_local_stack(tmp_path: Path) -> None:
    options = StackOptions(prometheus=False, alertmanager=False)
    with Stack(tmp_path / "stack", options) as stack:
        served = run_locust(stack, tmp_path / "open.json", 6)
        stack.set_vram(0.95)               # the sidecar closes the gate: misses are shed
        wait_until(lambda: stack.synthesize("Gate closed?")[0] == 503,
                   timeout=10, what="the gate to close")
        gated = run_locust(stack, tmp_path / "closed.json", 4)
    kinds = served["by_kind"]
    assert served["failed"] == 0, served
    assert served["success"] > 0, served
    for kind in ("hit", "miss", "job"):
        assert kinds.get(f"{kind}/success", 0) > 0, served
    assert kinds.get("bad/rejected", 0) > 0, served
    assert "bad/success" not in kinds, served
    assert served["p99_ms"] >= served["p50_ms"] > 0
    assert served["rps"] > 0
    # 503 INGRESS_CLOSED is shed, not failed; no miss is a success while the gate is shut
    assert gated["shed"] > 0, gated
    assert gated["failed"] == 0, gated
    assert "miss/success" not in gated["by_kind"], gated
