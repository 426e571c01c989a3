"""The real sidecar process (``python -m exporter``) driven over HTTP: the ``file:`` GPU source
moves VRAM, and ``/ingress``, the gate file and ``/metrics`` must follow within a second; the
Alertmanager webhook and the manual override close it for their own reasons."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.local_stack import REPO, Process, free_port, http_get, wait_until, write_gpu_file

pytestmark = pytest.mark.slow

TOKEN = "integration-token"
ALERT = "TTSGpuMemoryHigh"


class SidecarProcess:
    """One sidecar on a free port, everything it writes under one temp dir."""

    def __init__(self, workdir: Path, reopen_after_s: float = 0.3) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.gpu_file = workdir / "gpu.json"
        self.gate_file = workdir / "state" / "ingress.json"
        (workdir / "logs").mkdir()
        self.set_vram(0.40)
        config = {
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "logs": {"paths": [str(workdir / "logs" / "*.log")],
                     "checkpoint_path": str(workdir / "state" / "offsets.json")},
            "gpu": {"source": f"file:{self.gpu_file}", "poll_interval_s": 0.25},
            "gate": {"gate_file": str(self.gate_file), "reopen_after_s": reopen_after_s,
                     "retry_after_s": 7},
            "auth": {"bearer_token": TOKEN},
        }
        config_path = workdir / "exporter.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.process = Process(
            "exporter", [sys.executable, "-m", "exporter", "--config", str(config_path)],
            self.url("/healthz"), workdir / "exporter.out", REPO)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def set_vram(self, ratio: float) -> None:
        write_gpu_file(self.gpu_file, ratio)

    def ingress(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            with urllib.request.urlopen(self.url("/ingress"), timeout=2) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read()), dict(exc.headers)

    def gate_file_state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.gate_file.read_text())
        return data

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by name and sorted labels."""
        _, body = http_get(self.url("/metrics"))
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples}

    def post(self, path: str, body: Any, token: str = TOKEN) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[SidecarProcess]:
    running = SidecarProcess(tmp_path)
    running.process.start()
    try:
        running.process.wait_ready(timeout=20)
        yield running
    finally:
        code = running.process.stop()
    assert code == 0, f"sidecar exited with {code}:\n{running.process.log_tail()}"


def webhook(status: str) -> dict[str, Any]:
    labels = {"alertname": ALERT, "action": "close_ingress", "gpu": "0", "severity": "warning"}
    return {"version": "4", "status": status, "receiver": "sidecar", "groupKey": "{}:{}",
            "groupLabels": {"alertname": ALERT}, "commonLabels": labels,
            "alerts": [{"status": status, "labels": labels, "annotations": {},
                        "fingerprint": "3f2a1b"}]}


def test_vram_crossing_closes_within_a_second_and_reopens(sidecar: SidecarProcess) -> None:
    assert sidecar.ingress()[0] == 200
    assert sidecar.gate_file_state()["open"] is True

    crossed = time.monotonic()
    sidecar.set_vram(0.95)
    wait_until(lambda: sidecar.ingress()[0] == 503, timeout=1.0,
               what="/ingress to answer 503")
    wait_until(lambda: not sidecar.gate_file_state()["open"], timeout=1.0 - (
        time.monotonic() - crossed), what="the gate file to say closed")
    assert time.monotonic() - crossed < 1.0

    status, body, headers = sidecar.ingress()
    assert (status, body["reasons"], headers["Retry-After"]) == (503, ["vram"], "7")
    gate_file = sidecar.gate_file_state()
    assert gate_file == {"open": False, "reasons": ["vram"], "since": body["since"],
                         "retry_after_s": 7}
    samples = sidecar.metrics()
    used = samples[("tts_gpu_memory_used_bytes", (("gpu", "0"), ("uuid", "GPU-demo-0000")))]
    total = samples[("tts_gpu_memory_total_bytes", (("gpu", "0"), ("uuid", "GPU-demo-0000")))]
    assert used / total == pytest.approx(0.95, abs=1e-6)
    assert samples[("tts_gpu_up", ())] == 1.0
    assert samples[("tts_ingress_open", ())] == 0.0
    assert samples[("tts_ingress_closed_reason", (("reason", "vram"),))] == 1.0
    assert samples[("tts_ingress_transitions_total", (("to", "closed"),))] == 1.0

    sidecar.set_vram(0.50)
    wait_until(lambda: sidecar.ingress()[0] == 200, timeout=3.0, what="the gate to reopen")
    wait_until(lambda: sidecar.gate_file_state()["open"], timeout=1.0,
               what="the gate file to say open")
    samples = sidecar.metrics()
    assert samples[("tts_ingress_open", ())] == 1.0
    assert not [k for k in samples if k[0] == "tts_ingress_closed_reason"]
    assert samples[("tts_ingress_transitions_total", (("to", "open"),))] == 1.0


def test_webhook_with_the_token_closes_with_the_alert_reason(sidecar: SidecarProcess) -> None:
    assert sidecar.post("/alertmanager", webhook("firing"), token="wrong")[0] == 401
    assert sidecar.post("/alertmanager", {"version": "3"})[0] == 400
    assert sidecar.ingress()[0] == 200  # refused calls change nothing

    status, body = sidecar.post("/alertmanager", webhook("firing"))
    assert (status, body["open"], body["reasons"]) == (200, False, [f"alert:{ALERT}"])
    assert sidecar.ingress()[0] == 503
    assert sidecar.gate_file_state()["reasons"] == [f"alert:{ALERT}"]
    assert sidecar.metrics()[("tts_ingress_closed_reason", (("reason", f"alert:{ALERT}"),))] == 1

    sidecar.post("/alertmanager", webhook("resolved"))
    assert sidecar.ingress()[0] == 200
    assert sidecar.gate_file_state()["open"] is True


def test_manual_override_closes_and_opens_behind_the_token(sidecar: SidecarProcess) -> None:
    assert sidecar.post("/ingress", {"action": "close", "reason": "drill"}, token="x")[0] == 401
    assert sidecar.post("/ingress", {"action": "close", "reason": "drill"})[0] == 200
    assert sidecar.ingress()[1]["reasons"] == ["manual"]
    assert sidecar.post("/ingress", {"action": "open"})[0] == 200
    assert sidecar.ingress()[0] == 200


def test_a_broken_gpu_file_is_gpu_up_0_with_no_stale_readings(sidecar: SidecarProcess) -> None:
    assert sidecar.metrics()[("tts_gpu_up", ())] == 1.0
    sidecar.gpu_file.write_text("{broken")

    def down() -> bool:
        return sidecar.metrics()[("tts_gpu_up", ())] == 0.0

    wait_until(down, timeout=2.0, what="tts_gpu_up to drop to 0")
    samples = sidecar.metrics()
    assert not [k for k in samples if k[0] == "tts_gpu_memory_used_bytes"]
    assert samples[("tts_exporter_collector_errors_total", (("collector", "gpu"),))] >= 1
    assert sidecar.ingress()[0] == 200  # policy "hold": a broken reading does not close
    sidecar.set_vram(0.3)
    wait_until(lambda: sidecar.metrics()[("tts_gpu_up", ())] == 1.0, timeout=2.0,
               what="tts_gpu_up to recover")
    assert "GPU poll failed" in sidecar.process.log_tail(100)


def test_a_wedged_gpu_read_goes_stale_and_does_not_block_shutdown(
        sidecar: SidecarProcess) -> None:
    """A FIFO with no writer blocks the read forever, as a wedged driver does; the fixture then
    checks that SIGTERM still ends the process cleanly."""
    fifo = sidecar.workdir / "gpu.fifo"
    os.mkfifo(fifo)
    os.replace(fifo, sidecar.gpu_file)
    wait_until(lambda: sidecar.metrics()[("tts_gpu_up", ())] == 0.0, timeout=5.0,
               what="tts_gpu_up to drop once the read is stale (gpu.stale_after_s 2)")
    assert "still running after 2.0s (stale)" in sidecar.process.log_tail(100)


def test_an_exemplar_request_id_resolves_to_its_timeline(sidecar: SidecarProcess) -> None:
    """What an on-call engineer clicks: the slow request's id on the histogram (OpenMetrics
    exemplar) opens that request's timeline at /requests/{id} on the same sidecar."""
    records = [
        {"event": "synthesis_start", "text_len": 40},
        {"event": "stage_time", "stage": "llm_inference", "duration_ms": 2900},
        {"event": "synthesis_complete", "status": "failed", "error_code": "GPU_OOM",
         "duration_ms": 3000, "level": "ERROR"},
    ]
    with (sidecar.workdir / "logs" / "app.log").open("a") as log:
        for offset, record in enumerate(records):
            log.write(json.dumps({"time": 1_700_000_000 + offset, "level": "INFO",
                                  "request_id": "req-slow-1", **record}) + "\n")

    def exemplar_id() -> str | None:
        request = urllib.request.Request(
            sidecar.url("/metrics"), headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(request, timeout=2) as response:
            body = response.read().decode()
        for line in body.splitlines():
            if line.startswith("tts_synthesis_duration_seconds_bucket") and "# {" in line:
                return line.split('request_id="')[1].split('"')[0]
        return None

    wait_until(lambda: exemplar_id() is not None, 5, what="an exemplar on the histogram")
    rid = exemplar_id()
    assert rid == "req-slow-1"
    status, body = http_get(sidecar.url(f"/requests/{rid}"))
    timeline = json.loads(body)
    assert status == 200
    assert timeline["status"] == "failed"
    assert [r["event"] for r in timeline["records"]] == [r["event"] for r in records]
    assert timeline["stages"] == [{"stage": "llm_inference", "duration_ms": 2900,
                                   "offset_ms": 1000.0}]
    assert timeline["errors"][0]["error_code"] == "GPU_OOM"
    _, listing = http_get(sidecar.url("/requests?status=failed&limit=5"))
    assert [r["request_id"] for r in json.loads(listing)["requests"]] == ["req-slow-1"]
