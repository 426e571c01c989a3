"""The config loader: defaults, the shipped file, and the promised error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exporter.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_is_valid_and_matches_the_defaults() -> None:
    assert load_config(REPO / "config" / "exporter.yaml") == Config()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_values_are_converted_to_their_types(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
server: {listen: "0.0.0.0:9200"}
logs: {paths: [a.log, "b/*.log"], max_line_bytes: 1024}
gate: {close_at: 0.95, reopen_below: 0.8, reopen_after_s: 10, mode: auth_request}
gpu: {source: "file:/tmp/gpus.json"}
"""))
    assert config.server.host == "0.0.0.0" and config.server.port == 9200
    assert config.logs.paths == ["a.log", "b/*.log"]
    assert config.gate.close_at == 0.95 and config.gate.mode == "auth_request"
    assert isinstance(config.gate.reopen_after_s, float)
    assert config.gpu.source == "file:/tmp/gpus.json"


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("gate:\n  close_at: high\n", "gate.close_at", "expected a number"),
    ("gate:\n  close_at: 1.5\n", "gate.close_at", "expected a value <= 1"),
    ("gate:\n  close_at: 0.8\n", "gate.reopen_below", "<= gate.close_at"),
    ("gate:\n  mode: nginx\n", "gate.mode", "expected one of 'readiness', 'auth_request'"),
    ("logs:\n  pathz: [a]\n", "logs.pathz", "unknown key; expected one of"),
    ("logs:\n  paths: a.log\n", "logs.paths", "expected a list"),
    ("logs:\n  max_line_bytes: 0\n", "logs.max_line_bytes", "greater than 0"),
    ("logs:\n  max_line_bytes: 1.5\n", "logs.max_line_bytes", "expected an integer"),
    ("server:\n  listen: localhost\n", "server.listen", "HOST:PORT"),
    ("gpu:\n  source: cuda\n", "gpu.source", "'nvml', 'none' or 'file:PATH'"),
    ("gate:\n  enabled: yes please\n", "gate.enabled", "expected true or false"),
    ("logs:\n  aliases:\n    fields:\n      id: request_id\n", "logs.aliases.fields.id",
     "expected a list"),
    ("- just\n- a list\n", "(top level)", "expected a mapping"),
])
def test_bad_config_names_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "gate:\n  close_at: [0.9\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "absent.yaml")


def test_check_config_command_exits_1_with_the_message(tmp_path: Path) -> None:
    bad = write(tmp_path, "gate:\n  close_at: high\n")
    result = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(bad)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert f"{bad}: gate.close_at: expected a number, got 'high'" in result.stderr
    good = subprocess.run([sys.executable, "-m", "exporter", "check-config",
                           str(REPO / "config" / "exporter.yaml")],
                          capture_output=True, text=True, check=False)
    assert good.returncode == 0, good.stderr


def test_running_with_a_bad_config_stops_start_up(tmp_path: Path) -> None:
    bad = write(tmp_path, "server:\n  listen: 9109\n")
    result = subprocess.run([sys.executable, "-m", "exporter", "--config", str(bad)],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 1
    assert "server.listen: expected a string, got 9109" in result.stderr
