"""config/app.yaml is valid and complete; bad configs stop start-up with a precise message."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from multidict import CIMultiDict

from tts_app.config import AppConfig, ConfigError, config_from_mapping, load_config
from tts_app.identity import ClientIdentity

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_documents_the_defaults() -> None:
    shipped = load_config(REPO / "config" / "app.yaml")
    defaults = AppConfig()
    # only the backend's constructor options are spelled out beyond the defaults
    assert shipped.model_copy(update={"backend": defaults.backend}) == defaults
    assert shipped.backend.espeak == {"instances": 2, "rate_wpm": 175}


def test_shipped_config_has_the_keys_local_stack_rewrites() -> None:
    data = yaml.safe_load((REPO / "config" / "app.yaml").read_text())
    assert data["server"]["listen"] == "127.0.0.1:8080"
    assert data["log"]["path"] and data["log"]["format"] in ("json", "text")
    assert data["cache"]["dir"] and data["gate"]["file"] == "state/ingress.json"
    assert data["limits"]["text_max_chars"] == 2000


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
    ({"server": {"header_timeout_s": "soon"}}, "server.header_timeout_s", "a number"),
    ({"admission": {"rate_limit": {"global_rate_per_s": 0}}},
     "admission.rate_limit.global_rate_per_s", ">= 0.001"),
    ({"admission": {"rate_limit": {"client_header": "X-Client-ID"}}},
     "admission.rate_limit.client_header", "unknown key"),
])
def test_bad_values_name_key_and_expectation(data: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data, "app.yaml")
    assert caught.value.key == key and expected in caught.value.problem
    assert str(caught.value).startswith(f"app.yaml: {key}: ")


def run_app(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tts_app", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO)


def test_bad_config_file_exits_1_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("admission:\n  queue_size: lots\n")
    result = run_app("--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}: admission.queue_size: expected an integer, got 'lots'" in result.stderr


def test_bad_backend_option_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"backend:\n  espeak: {{voices_please: 3}}\nlog: {{path: {tmp_path}/l.log}}\n")
    result = run_app("--config", str(bad))
    assert result.returncode == 1 and "backend.espeak" in result.stderr


def test_model_that_fails_to_load_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0"}, "log": {"path": str(tmp_path / "app.log")},
        "cache": {"dir": str(tmp_path / "c")},
        "backend": {"espeak": {"data_path": str(tmp_path / "missing")}}}))
    result = run_app("--config", str(config))
    assert result.returncode == 1
    assert "backend espeak failed to load" in result.stderr and "phontab" in result.stderr
    assert '"event": "model_load_failed"' in (tmp_path / "app.log").read_text()
