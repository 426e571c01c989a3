"""Issue 18 finding 2: the IndexTTS lines through the running sidecar, tailed from a real file
and read back from its /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_log_restart import Sidecar
from tests.support.local_stack import http_get, wait_until

pytestmark = pytest.mark.slow


def test_indextts_fields_reach_metrics_and_the_text_does_not(tmp_path: Path,
                                                             indextts_lines: bytes) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "indextts.log").write_bytes(indextts_lines)
    sidecar = Sidecar(tmp_path)
    sidecar.start()
    try:
        wait_until(lambda: sidecar.counter("tts_exporter_log_lines_total",
                                           outcome="parsed") == {"parsed": 5.0},
                   10, what="the five lines parsed")
        samples = {(name, tuple(sorted(labels.items()))): value
                   for name, labels, value in sidecar.samples()}
        _, body = http_get(f"http://127.0.0.1:{sidecar.port}/metrics")
    finally:
        sidecar.process.stop()
    assert samples[("tts_audio_rms_count", ())] == 1
    assert samples[("tts_audio_spectral_centroid_hertz_sum", ())] == 2150
    assert samples[("tts_cache_usage_ratio", (("path", "/app/cache"),))] == pytest.approx(0.927)
    assert samples[("tts_synthesis_fallbacks_total", ())] == 1
    assert samples[("tts_audio_bytes_total", ())] == 124 * 1024
    assert samples[("tts_text_length_chars_sum", ())] == 6
    assert samples[("tts_syntheses_total", (("error_code", "none"),
                                            ("model_version", "unknown"),
                                            ("status", "success")))] == 3
    assert "今天".encode() not in body
