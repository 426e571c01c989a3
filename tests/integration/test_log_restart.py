"""The real sidecar process killed with SIGKILL at random moments while an app log grows (and
rotates): after the last restart, /metrics counts every written line and synthesis exactly
once."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import REPO, load_local_stack

stack = load_local_stack()
pytestmark = pytest.mark.slow


def contract_line(index: int) -> tuple[str, tuple[str, str]]:
    """A synthesis_complete JSON line as the app writes it, and its (status, error_code)."""
    failed = index % 7 == 3
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime()),
              "level": "ERROR" if failed else "INFO", "logger": "tts_app.engine",
              "event": "synthesis_complete", "request_id": f"req-{index:06d}",
              "status": "failed" if failed else "success", "duration_ms": 100 + index % 900,
              "cache_hit": False, "cache_saved": not failed, "audio_size_kb": 12,
              "audio_duration_ms": 900, "text_len": 20 + index % 50}
    if failed:
        record.update(error_code="GPU_OOM", model_stage="llm_inference")
    return json.dumps(record), ("failed", "GPU_OOM") if failed else ("success", "none")


class Sidecar:
    def __init__(self, workdir: Path, pattern: str = "*.log") -> None:
        self.port = stack.free_port()
        config = {
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "logs": {"paths": [str(workdir / "logs" / pattern)],
                     "checkpoint_path": str(workdir / "state" / "offsets.json"),
                     "checkpoint_interval_s": 0.1, "poll_interval_s": 0.2,
                     "read_chunk_bytes": 4096},
            "gpu": {"source": "none"},
            "gate": {"enabled": False},
        }
        config_path = workdir / "exporter.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.process = stack.Process(
            "exporter", [sys.executable, "-m", "exporter", "--config", str(config_path)],
            f"http://127.0.0.1:{self.port}/healthz", workdir / "exporter.out", REPO)

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(timeout=20)

    def kill(self) -> None:
        assert self.process.popen is not None
        self.process.popen.send_signal(signal.SIGKILL)
        self.process.popen.wait(5)

    def totals(self) -> tuple[float, Counter[tuple[str, str]]]:
        _, body = stack.http_get(f"http://127.0.0.1:{self.port}/metrics")
        lines, syntheses = 0.0, Counter[tuple[str, str]]()
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "tts_exporter_log_lines_total":
                    lines += sample.value
                elif sample.name == "tts_syntheses_total":
                    syntheses[(sample.labels["status"], sample.labels["error_code"])] += \
                        int(sample.value)
        return lines, syntheses


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    sidecar = Sidecar(tmp_path)
    expected: Counter[tuple[str, str]] = Counter()
    written = 0
    sidecar.start()
    try:
        for round_ in range(6):
            for _ in range(rng.randint(2, 5)):
                batch = [contract_line(written + i) for i in range(rng.randint(50, 400))]
                text = "".join(line + "\n" for line, _ in batch)
                cut = rng.randint(0, len(text))  # a partial line may sit there at the kill
                with log.open("a") as out:
                    out.write(text[:cut])
                    out.flush()
                    time.sleep(rng.uniform(0.0, 0.15))
                    out.write(text[cut:])
                written += len(batch)
                expected.update(labels for _, labels in batch)
                time.sleep(rng.uniform(0.0, 0.3))
            if round_ == 2:  # rotate: the renamed file still matches the glob
                os.rename(log, log.with_name("app.1.log"))
            sidecar.kill()
            if round_ % 2:  # lines written while the sidecar is down
                batch = [contract_line(written + i) for i in range(100)]
                with log.open("a") as out:
                    out.writelines(line + "\n" for line, _ in batch)
                written += len(batch)
                expected.update(labels for _, labels in batch)
            sidecar.start()
        stack.wait_until(lambda: sidecar.totals()[0] >= written, timeout=10,
                         what=f"{written} lines counted")
        time.sleep(0.5)  # anything counted twice would show up by now
        lines, syntheses = sidecar.totals()
    finally:
        sidecar.process.stop()
    assert lines == written
    assert syntheses == expected
