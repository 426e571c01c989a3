"""config/app.yaml is valid and complete; bad configs stop start-up with a precise message."""

from __future__ import annotations

import glob
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml
from multidict import CIMultiDict

from tests.conftest import busy_port
from tts_app.config import AppConfig, ConfigError, config_from_mapping, load_config
from tts_app.identity import ClientIdentity

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_documents_the_defaults() -> None:
    shipped = load_config(REPO / "config" / "app.yaml")
    defaults = AppConfig()
    # only the backend's constructor options are spelled out beyond the defaults
    assert msgspec.structs.replace(shipped, backend=defaults.backend) == defaults
    assert shipped.backend.espeak == {"instances": 2, "rate_wpm": 175}


def test_the_shipped_configs_meet_where_nginx_and_the_sidecar_look(tmp_path: Path) -> None:
    """Run from the checkout as shipped: nginx proxies to where the app and the sidecar listen,
    the sidecar tails the app's log (and its rotated backups) and writes the gate file the app
    reads."""
    app = load_config(REPO / "config" / "app.yaml")
    sidecar = yaml.safe_load((REPO / "config" / "exporter.yaml").read_text())
    nginx = (REPO / "config" / "nginx" / "tts.conf").read_text()
    upstreams = dict(re.findall(r"upstream (\w+) \{\s*server ([\d.]+:\d+);", nginx))
    assert upstreams == {"tts_app": app.server.listen, "tts_sidecar": sidecar["server"]["listen"]}
    assert app.gate.file == sidecar["gate"]["gate_file"]
    written = {app.log.path, app.log.path + ".1"}
    for path in written:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    tailed = {found for pattern in sidecar["logs"]["paths"]
              for found in glob.glob(pattern, root_dir=tmp_path)}
    assert written <= tailed


def test_shipped_nginx_is_a_trusted_proxy_that_drops_client_identity_claims() -> None:
    shipped = load_config(REPO / "config" / "app.yaml")
    nginx = (REPO / "config" / "nginx" / "tts.conf").read_text()
    upstream = re.search(r"upstream tts_app \{\s*server ([\d.]+):\d+;", nginx)
    assert upstream is not None
    identity = ClientIdentity(shipped.identity.trusted_proxies, shipped.identity.client_header)
    # nginx connects from the loopback address it proxies to
    assert identity.of(upstream.group(1), CIMultiDict({"X-Forwarded-For": "203.0.113.9"})) \
        == "203.0.113.9"
    assert f'proxy_set_header {shipped.identity.client_header} "";' in nginx
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in nginx


@pytest.mark.parametrize(("data", "key", "expected"), [
    ({"server": {"listen": "8080"}}, "server.listen", "HOST:PORT"),
    ({"log": {"format": "xml"}}, "log.format", "one of 'json', 'text'"),
    ({"backend": {"name": "tacotron"}}, "backend.name", "one of 'espeak', 'chattts'"),
    ({"admission": {"queue_size": -1}}, "admission.queue_size", ">= 0"),
    ({"admission": {"rate_limit": {"burst": "lots"}}}, "admission.rate_limit.burst",
     "a number"),
    ({"cache": {"max_byte": 5}}, "cache.max_byte", "unknown key"),
    ({"gate": []}, "gate", "a mapping"),
    ({"identity": {"trusted_proxies": ["127.0.0.1", "10.0.0.300/8"]}},
     "identity.trusted_proxies", "'10.0.0.300/8' is not one"),
    ({"identity": {"trusted_proxies": "127.0.0.1"}}, "identity.trusted_proxies", "a list"),
    ({"server": {"body_timeout_s": 0}}, "server.body_timeout_s", ">= 0.1"),
    ({"store": {"url": "mysql://db:3306"}}, "store.url", "expected local or a Redis URL"),
    ({"store": {"timeout_s": 0}}, "store.timeout_s", ">= 0.001"),
    ({"server": {"header_timeout_s": "soon"}}, "server.header_timeout_s", "a number"),
    ({"admission": {"rate_limit": {"global_rate_per_s": 0}}},
     "admission.rate_limit.global_rate_per_s", ">= 0.001"),
    ({"admission": {"rate_limit": {"client_header": "X-Client-ID"}}},
     "admission.rate_limit.client_header", "unknown key"),
])
def test_bad_values_name_key_and_expectation(data: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data, "app.yaml")
    assert caught.value.key == key
    assert expected in caught.value.problem
    assert str(caught.value).startswith(f"app.yaml: {key}: ")


def run_app(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tts_app", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO)


@pytest.mark.slow
def test_bad_config_file_exits_1_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("admission:\n  queue_size: lots\n")
    result = run_app("--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}: admission.queue_size: expected an integer, got 'lots'" in result.stderr


@pytest.mark.slow
def test_bad_backend_option_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"backend:\n  espeak: {{voices_please: 3}}\nlog: {{path: {tmp_path}/l.log}}\n")
    result = run_app("--config", str(bad))
    assert result.returncode == 1
    assert "backend.espeak" in result.stderr


@pytest.mark.slow
def test_model_that_fails_to_load_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0"}, "log": {"path": str(tmp_path / "app.log")},
        "cache": {"dir": str(tmp_path / "c")},
        "backend": {"espeak": {"data_path": str(tmp_path / "missing")}}}))
    result = run_app("--config", str(config))
    assert result.returncode == 1
    assert "backend espeak failed to load" in result.stderr
    assert "phontab" in result.stderr
    assert '"event": "model_load_failed"' in (tmp_path / "app.log").read_text()


# --- issue 22: every value bounded, every problem at once, tts-app check-config --------------

HUGE = 10 ** 400


@pytest.mark.parametrize(("data", "key", "expected"), [
    ({"server": {"listen": "999.1.1.1:80"}}, "server.listen", "an IP address or DNS name"),
    ({"admission": {"queue_size": HUGE}}, "admission.queue_size", "<= 1000000"),
    ({"admission": {"shed_delay_s": float("nan")}}, "admission.shed_delay_s", "finite"),
    ({"jobs": {"ttl_s": float("inf")}}, "jobs.ttl_s", "finite"),
    ({"backend": {"timeout_s": HUGE}}, "backend.timeout_s", "expected a number"),
    ({"cache": {"max_bytes": True}}, "cache.max_bytes", "expected an integer, got True"),
    ({"limits": {"languages": ["en", 5]}}, "limits.languages[1]", "a string, got 5"),
    ({"log": {"path": "x" * 5000}}, "log.path", "at most 4096 characters"),
])
def test_values_past_their_bound_name_key_and_bound(data: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data, "app.yaml")
    assert caught.value.key == key, caught.value
    assert expected in caught.value.problem, caught.value


@pytest.mark.slow
def test_check_config_lists_every_problem_and_passes_the_shipped_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('server: {listen: "999.1.1.1:80"}\nadmission: {queue_size: lots}\n'
                   "batch: {max_size: 0, max_wait_ms: .nan}\nbatch: {max_size: 1}\n")
    result = run_app("check-config", str(bad))
    assert result.returncode == 1
    assert result.stderr == f"invalid: {bad}: line 4, column 1: not valid YAML (duplicate " \
                            "key 'batch' (the last would win))\n"
    bad.write_text('server: {listen: "999.1.1.1:80"}\nadmission: {queue_size: lots}\n'
                   "batch: {max_size: 0, max_wait_ms: .nan}\n")
    result = run_app("check-config", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert [line.split(": ")[2] for line in result.stderr.splitlines()] == [
        "server.listen", "admission.queue_size", "batch.max_size", "batch.max_wait_ms"]
    good = run_app("check-config", str(REPO / "config" / "app.yaml"))
    assert good.returncode == 0, good.stderr
    assert good.stdout.endswith(": valid\n"), good.stderr


@pytest.mark.slow
@pytest.mark.parametrize("raw", [b"\xff\xfe", b"a: " + b"{" * 50_000, b"a: " + b"9" * 5000])
def test_hostile_config_files_are_one_message_not_a_traceback(tmp_path: Path,
                                                              raw: bytes) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(raw)
    result = run_app("check-config", str(bad))
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"invalid: {bad}: ")


@pytest.mark.slow
def test_a_vanished_config_file_is_one_message(tmp_path: Path) -> None:
    result = run_app("--config", str(tmp_path / "gone.yaml"))
    assert result.returncode == 1
    assert result.stderr == f"tts-app: {tmp_path / 'gone.yaml'}: cannot read the file " \
                            "(No such file or directory)\n"


@pytest.mark.slow
def test_a_busy_port_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with busy_port() as port:
        config = tmp_path / "app.yaml"
        config.write_text(f'server: {{listen: "127.0.0.1:{port}"}}\n'
                          f"log: {{path: {tmp_path}/app.log}}\ncache: {{dir: {tmp_path}/c}}\n")
        result = run_app("--config", str(config))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"tts-app: {config}: server.listen: cannot listen on 127.0.0.1:{port} (")
