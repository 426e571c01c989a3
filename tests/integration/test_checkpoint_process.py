"""Issue 14 finding 4 on the real sidecar process: a checkpoint whose metrics do not validate
once crashed start-up every time or made every /metrics answer 500. Now it is moved aside,
the process serves /metrics, and its totals equal a fresh read of the logs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_log_restart import Sidecar, contract_line
from tests.support.local_stack import http_get, wait_until

pytestmark = pytest.mark.slow

LINES = 200


def series_five(metrics: dict[str, Any]) -> None:
    metrics["tts_synthesis_duration_seconds"]["series"] = 5


def sample_without_value(metrics: dict[str, Any]) -> None:
    metrics["tts_syntheses"][0] = [metrics["tts_syntheses"][0][0]]


def bucket_short(metrics: dict[str, Any]) -> None:
    metrics["tts_text_length_chars"]["series"][0][1].pop()


@pytest.mark.parametrize("corrupt", [series_five, sample_without_value, bucket_short])
def test_a_malformed_checkpoint_is_moved_aside_and_the_sidecar_counts_from_the_start(
        tmp_path: Path, corrupt: Callable[[dict[str, Any]], None]) -> None:
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    batch = [contract_line(i) for i in range(LINES)]
    log.write_text("".join(line + "\n" for line, _ in batch))
    expected = Counter(labels for _, labels in batch)
    sidecar = Sidecar(tmp_path)
    sidecar.start()
    try:
        wait_until(lambda: sidecar.totals()[0] >= LINES, timeout=10, what="first read")
    finally:
        sidecar.process.stop()                   # a clean stop writes the final checkpoint
    checkpoint = tmp_path / "state" / "offsets.json"
    data = json.loads(checkpoint.read_text())
    assert data["files"][0]["offset"] == log.stat().st_size
    corrupt(data["metrics"])
    checkpoint.write_text(json.dumps(data))

    sidecar.start()
    try:
        wait_until(lambda: sidecar.totals()[0] >= LINES, timeout=10, what="re-read")
        status, _ = http_get(f"http://127.0.0.1:{sidecar.port}/metrics")
        lines, syntheses = sidecar.totals()
    finally:
        sidecar.process.stop()
    assert status == 200
    assert (lines, syntheses) == (LINES, expected)
    assert len(list(checkpoint.parent.glob("offsets.json.corrupt-*"))) == 1
    assert "is not a valid checkpoint (metrics" in sidecar.process.log_tail(200)
