"""config/prometheus.yml and config/alertmanager.yml: valid for promtool and amtool as shipped
and as tests/support/local_stack.py rewrites them, and routed the way the on-call loop needs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.config_checks.artefacts import (
    ALERTMANAGER_CONFIG,
    PROMETHEUS_CONFIG,
    REPO,
    RULES,
    require_binary,
)
from tests.support.local_stack import Stack, StackOptions


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)


def receiver_for(config: Path, labels: dict[str, str]) -> str:
    argv = [require_binary("amtool"), "config", "routes", "test", f"--config.file={config}",
            *(f"{key}={value}" for key, value in labels.items())]
    result = run(argv)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.fixture
def written(tmp_path: Path) -> Any:
    """The configs as the demo and the end-to-end tests write them (no process started)."""
    options = StackOptions(scrape_interval="1s", evaluation_interval="1s", max_alert_for="2s",
                           group_wait="1s")
    return Stack(tmp_path / "stack", options)


def test_promtool_accepts_the_shipped_prometheus_config() -> None:
    result = run([require_binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_prometheus_config_loads_the_rules_and_scrapes_the_sidecar() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    rule_files = [(PROMETHEUS_CONFIG.parent / path).resolve() for path in config["rule_files"]]
    assert rule_files == [RULES]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"tts-exporter", "prometheus"}
    assert jobs["tts-exporter"]["static_configs"] == [{"targets": ["127.0.0.1:9109"]}]
    alertmanagers = config["alerting"]["alertmanagers"][0]["static_configs"]
    assert alertmanagers == [{"targets": ["127.0.0.1:9093"]}]


def test_promtool_accepts_the_prometheus_config_local_stack_writes(written: Any) -> None:
    path = written.write_prometheus_config()
    result = run([require_binary("promtool"), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in config["scrape_configs"]}
    assert targets["tts-exporter"] == [f"127.0.0.1:{written.ports['exporter']}"]
    assert targets["prometheus"] == [f"127.0.0.1:{written.ports['prometheus']}"]


def test_amtool_accepts_the_shipped_alertmanager_config() -> None:
    result = run([require_binary("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_close_ingress_alerts_go_to_the_sidecar_and_the_rest_to_the_pager() -> None:
    gpu = {"alertname": "TTSGpuMemoryHigh", "action": "close_ingress", "severity": "warning"}
    assert receiver_for(ALERTMANAGER_CONFIG, gpu) == "tts-sidecar-gate"
    for alertname in ("TTSIngressClosedTooLong", "TTSHttp5xxRatioHigh", "TTSExporterDown"):
        page = {"alertname": alertname, "severity": "critical"}
        assert receiver_for(ALERTMANAGER_CONFIG, page) == "pager"


def test_sidecar_webhook_is_authenticated_and_hears_resolutions_quickly() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    hook = receivers["tts-sidecar-gate"]["webhook_configs"][0]
    assert hook["url"] == "http://127.0.0.1:9109/alertmanager"
    assert hook["send_resolved"] is True
    assert hook["http_config"]["authorization"]["credentials_file"]
    route = next(r for r in config["route"]["routes"] if r["receiver"] == "tts-sidecar-gate")
    assert route["group_wait"] == "1s"
    assert route["group_interval"] == "10s"


def test_amtool_accepts_the_alertmanager_config_local_stack_writes(written: Any) -> None:
    path = written.write_alertmanager_config()
    result = run([require_binary("amtool"), "check-config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    hooks = {r["name"]: r["webhook_configs"][0] for r in config["receivers"]}
    assert hooks["tts-sidecar-gate"]["url"] == written.url("exporter", "/alertmanager")
    assert hooks["tts-sidecar-gate"]["http_config"]["authorization"]["credentials_file"] == \
        str(written.token_file)
    assert hooks["pager"]["url"] == written.url("pager", "/page")
    assert receiver_for(path, {"alertname": "TTSGpuMemoryHigh", "action": "close_ingress"}) \
        == "tts-sidecar-gate"
