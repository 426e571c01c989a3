"""The config loader: defaults, the shipped file, and the promised error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import Config, ConfigError, load_config
from exporter.gate import Gate
from tests.conftest import FakeClock, busy_port
from tests.support.local_stack import free_port

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exporter.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_is_valid_and_matches_the_defaults() -> None:
    assert load_config(REPO / "config" / "exporter.yaml") == Config()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_values_in_the_file_decide_what_the_sidecar_does(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
server: {listen: "0.0.0.0:9200"}
logs: {paths: [a.log, "b/*.log"], max_line_bytes: 1024}
gate: {close_at: 0.95, reopen_below: 0.8, reopen_after_s: 10, mode: auth_request}
gpu: {source: "file:/tmp/gpus.json"}
"""))
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9200)
    assert config.logs.tailed_paths() == ["a.log", "b/*.log"]
    assert config.gate.mode == "auth_request"
    assert config.gpu.source == "file:/tmp/gpus.json"
    # The gate built from this file closes at 0.95, not at 0.94, and reopens only after 0.8
    # has held for 10 s (not the defaults: 0.90, 0.85, 30 s).
    clock = FakeClock()
    gate = Gate.from_config(config.gate, stale_after_s=2.0, clock=clock, wall_clock=clock)
    gate.observe_gpus([0.94])
    assert gate.state.open
    gate.observe_gpus([0.95])
    assert not gate.state.open
    gate.observe_gpus([0.81])
    clock.advance(60)
    gate.observe_gpus([0.81])
    assert not gate.state.open
    gate.observe_gpus([0.8])
    clock.advance(9.9)
    gate.observe_gpus([0.8])
    assert not gate.state.open
    clock.advance(0.1)
    gate.observe_gpus([0.8])
    assert gate.state.open


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("gate:\n  close_at: high\n", "gate.close_at", "expected a number"),
    ("gate:\n  close_at: 1.5\n", "gate.close_at", "expected a value <= 1"),
    ("gate:\n  close_at: 0.8\n", "gate.reopen_below", "<= gate.close_at"),
    ("gate:\n  mode: nginx\n", "gate.mode", "expected one of 'readiness', 'auth_request'"),
    ("logs:\n  pathz: [a]\n", "logs.pathz", "unknown key; expected one of"),
    ("logs:\n  paths: a.log\n", "logs.paths", "expected a list"),
    ("logs:\n  max_line_bytes: 0\n", "logs.max_line_bytes", "expected a value >= 1"),
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_running_with_a_bad_config_stops_start_up(tmp_path: Path) -> None:
    bad = write(tmp_path, "server:\n  listen: 9109\n")
    result = subprocess.run([sys.executable, "-m", "exporter", "--config", str(bad)],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 1
    assert "server.listen: expected a string, got 9109" in result.stderr


# --- issue 22: nothing check-config passes may crash start-up; every problem at once ---------

HUGE = 10 ** 400


def problems_of(tmp_path: Path, text: str | bytes) -> list[tuple[str, str]]:
    path = tmp_path / "exporter.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    return caught.value.problems


@pytest.mark.parametrize(("text", "key", "expected"), [
    # passed check-config, then crashed start-up
    ("timelines: {max_lines: 1000000000000000000000000000000}", "timelines.max_lines",
     "expected a value <= 1000000"),
    ('server: {listen: "999.1.1.1:80"}', "server.listen", "an IP address or DNS name"),
    ('server: {listen: "host_name!:80"}', "server.listen", "an IP address or DNS name"),
    # a traceback instead of a message
    (f"logs: {{max_line_bytes: {HUGE}}}", "logs.max_line_bytes", "expected a value <= "),
    (f"gate: {{close_at: {HUGE}}}", "gate.close_at", "expected a number"),
    # accepted silently
    ("metrics: {duration_buckets_s: [-1, 1, 1]}", "metrics.duration_buckets_s[0]",
     "greater than 0"),
    ("metrics: {duration_buckets_s: [0.5, 1, 1]}", "metrics.duration_buckets_s",
     "expected increasing values, each once"),
    ("metrics: {text_length_buckets: [.nan, 1]}", "metrics.text_length_buckets[0]",
     "expected a finite number"),
    ("disk: {thresholds: [5, -1]}", "disk.thresholds[0]", "expected a value <= 1"),
    ("logs: {poll_interval_s: .inf}", "logs.poll_interval_s", "expected a finite number"),
    ("gpu: {stale_after_s: -.inf}", "gpu.stale_after_s", "expected a finite number"),
    ("logs: {min_pass_interval_s: -0.1}", "logs.min_pass_interval_s", ">= 0"),
    ("logs: {min_pass_interval_s: 61}", "logs.min_pass_interval_s", "<= 60"),
    ("logs: {min_pass_interval_s: .nan}", "logs.min_pass_interval_s", "expected a finite number"),
    (f"logs: {{min_pass_interval_s: {HUGE}}}", "logs.min_pass_interval_s", "expected a number"),
    ("logs: {min_pass_interval_s: [1]}", "logs.min_pass_interval_s", "expected a number"),
    ("server: {max_connections: 10000000}", "server.max_connections", "<= 65536"),
    ("probe: {url: 5}", "probe.url", "expected a string, got 5"),
    ("timelines: {fields: {a: 1}}", "timelines.fields", "expected a list, got {'a': 1}"),
])
def test_a_value_out_of_its_bound_is_refused_naming_key_and_bound(
        tmp_path: Path, text: str, key: str, expected: str) -> None:
    problems = problems_of(tmp_path, text)
    assert any(k == key and expected in p for k, p in problems), problems


def test_duplicate_keys_are_refused_instead_of_the_last_winning(tmp_path: Path) -> None:
    (_, problem), = problems_of(tmp_path, "gate: {close_at: 0.9}\ngate: {close_at: 0.5}\n")
    assert "line 2, column 1" in problem
    assert "duplicate key 'gate'" in problem
    (_, problem), = problems_of(tmp_path, "gate:\n  close_at: 0.9\n  close_at: 0.95\n")
    assert "duplicate key 'close_at'" in problem


@pytest.mark.parametrize(("raw", "expected"), [
    (b"gate: {close_at: 0.9}\n\xff\xfe", "expected UTF-8 text, got byte 0xff at offset 22"),
    (b"a: " + b"[" * 50_000, "nested less deeply"),
    (b"a: " + b"9" * 5000, "not valid YAML"),                 # past Python's digit limit
    (b"a: !!python/object:os.system {}", "not valid YAML"),  # only plain YAML is read
])
def test_hostile_files_are_a_config_error_not_a_traceback(tmp_path: Path, raw: bytes,
                                                          expected: str) -> None:
    (_, problem), = problems_of(tmp_path, raw)
    assert expected in problem


@pytest.mark.slow
def test_check_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    bad = write(tmp_path, f"""
server: {{listen: "999.1.1.1:80"}}
logs: {{poll_interval_s: .inf, max_line_bytes: {HUGE}, pathz: []}}
metrics: {{duration_buckets_s: [1, 1]}}
disk: {{thresholds: [5, -1]}}
gate: {{close_at: high}}
""")
    result = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(bad)],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    keys = [line.split(": ")[2] for line in result.stderr.splitlines()]
    assert keys == ["server.listen", "logs.poll_interval_s", "logs.max_line_bytes",
                    "logs.pathz", "metrics.duration_buckets_s", "disk.thresholds[0]",
                    "disk.thresholds[1]", "gate.close_at"], result.stderr
    assert all(line.startswith(f"invalid: {bad}: ") for line in result.stderr.splitlines())


def run_sidecar(config: Path, prefix: list[str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "exporter", "--config",
                           str(config)], capture_output=True, text=True, check=False,
                          timeout=60, cwd=config.parent)


@pytest.mark.slow
def test_a_busy_port_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with busy_port() as port:
        result = run_sidecar(write(tmp_path, f'server: {{listen: "127.0.0.1:{port}"}}\n'
                                             "gpu: {source: none}\n"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"tts-exporter: cannot start: server.listen: cannot listen on 127.0.0.1:{port} "
        f"(error while attempting to bind on address ('127.0.0.1', {port}): address already "
        "in use)")


@pytest.mark.slow
def test_an_unwritable_state_file_stops_start_up_with_one_line(
        tmp_path: Path, permissions_apply: list[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        result = run_sidecar(write(tmp_path, f'server: {{listen: "127.0.0.1:{free_port()}"}}\n'
                                             "gpu: {source: none}\n"
                                             f"gate: {{gate_file: {locked}/sub/ingress.json}}\n"),
                             permissions_apply)
    finally:
        locked.chmod(0o700)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"tts-exporter: cannot start: GateComponent cannot start: [Errno 13] Permission "
        f"denied: '{locked}/sub'")


@pytest.mark.slow
def test_an_unreadable_config_file_is_one_line(tmp_path: Path,
                                               permissions_apply: list[str]) -> None:
    config = write(tmp_path, "")
    config.chmod(0)
    result = subprocess.run([*permissions_apply, sys.executable, "-m", "exporter",
                             "check-config", str(config)], capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 1
    assert result.stderr == f"invalid: {config}: cannot read the file (Permission denied)\n"
