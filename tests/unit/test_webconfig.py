"""The exporter-toolkit web config: what loads, what stops start-up (naming file and key), and
basic auth's bcrypt checks with their short success cache."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from exporter.__main__ import main
from exporter.config import Config, ConfigError, TimelinesConfig
from exporter.logs.timelines import TimelineComponent
from exporter.metrics import SidecarMetrics
from exporter.sidecar import build_components
from exporter.webconfig import BasicAuth, load_web_config
from tests.unit.conftest import TlsFiles

REPO = Path(__file__).resolve().parents[2]
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_full_web_config_loads(tmp_path: Path, tls_files: TlsFiles) -> None:
    web = load_web_config(write(tmp_path, {
        "tls_server_config": {"cert_file": str(tls_files.server_cert),
                              "key_file": str(tls_files.server_key),
                              "client_ca_file": str(tls_files.ca),
                              "client_auth_type": "RequireAndVerifyClientCert",
                              "min_version": "TLS13"},
        "basic_auth_users": {"prometheus": HASH}}))
    assert web.ssl_context is not None
    assert web.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert web.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert web.users == {"prometheus": HASH.encode()}


@pytest.mark.parametrize(("tls", "users", "key"), [
    ({}, {"u": "plaintext"}, "basic_auth_users.u"),
    ({"client_auth_type": "RequireAnyClientCert"}, {}, "tls_server_config.client_auth_type"),
    ({"client_auth_type": "VerifyClientCertIfGiven"}, {}, "tls_server_config.client_ca_file"),
    ({"key_file": ""}, {}, "tls_server_config"),
    ({"cert_file": "/nonexistent.crt"}, {}, "tls_server_config.cert_file"),
    ({"min_version": "TLS10"}, {}, "tls_server_config.min_version"),
    ({"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}, {}, "tls_server_config.cipher_suites"),
])
def test_an_invalid_web_config_names_file_and_key(tmp_path: Path, tls_files: TlsFiles,
                                                  tls: dict[str, Any], users: dict[str, str],
                                                  key: str) -> None:
    base = {"cert_file": str(tls_files.server_cert), "key_file": str(tls_files.server_key)}
    path = write(tmp_path, {"tls_server_config": {**base, **tls}, "basic_auth_users": users})
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert caught.value.file == str(path)
    assert caught.value.key == key


def test_unsupported_sections_are_refused_not_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, {"http_server_config": {"http2": True}})
    with pytest.raises(ConfigError, match="http_server_config: not supported"):
        load_web_config(path)


def test_check_config_validates_the_web_config_too(tmp_path: Path) -> None:
    web = write(tmp_path, {"basic_auth_users": {"u": "not-a-hash"}})
    config = tmp_path / "exporter.yaml"
    config.write_text(yaml.safe_dump({"server": {"web_config_file": str(web)}}))
    assert main(["check-config", str(config)]) == 1
    web.write_text(yaml.safe_dump({"basic_auth_users": {"u": HASH}}))
    assert main(["check-config", str(config)]) == 0


async def test_basic_auth_checks_bcrypt_and_refuses_anything_else() -> None:
    auth = BasicAuth({"prometheus": HASH.encode()})
    assert await auth.check(basic("prometheus", "s3cret"))
    for header in (basic("prometheus", "wrong"), basic("nobody", "s3cret"), "Basic !!!",
                   "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer s3cret", "",
                   "Basic \udcff\udcfe"):
        assert not await auth.check(header), header


async def test_a_successful_check_is_remembered_for_its_cache_time() -> None:
    now = [0.0]
    auth = BasicAuth({"prometheus": HASH.encode()}, cache_s=60, clock=lambda: now[0])
    assert await auth.check(basic("prometheus", "s3cret"))
    # The password changes; the remembered success holds until it expires, then bcrypt decides.
    auth.users["prometheus"] = bcrypt.hashpw(b"rotated", bcrypt.gensalt(rounds=4))
    now[0] = 59.0
    assert await auth.check(basic("prometheus", "s3cret"))
    now[0] = 61.0
    assert not await auth.check(basic("prometheus", "s3cret"))
    assert await auth.check(basic("prometheus", "rotated"))


def test_timelines_disabled_serves_no_requests_routes() -> None:
    config = Config(timelines=TimelinesConfig(enabled=False))
    components = build_components(config, SidecarMetrics())
    assert not any(isinstance(c, TimelineComponent) for c in components)
    assert not [r for c in components for r in c.routes if r.path.startswith("/requests")]


def test_the_shipped_example_loads_with_real_certificates(tmp_path: Path,
                                                          tls_files: TlsFiles) -> None:
    example = yaml.safe_load((REPO / "config" / "exporter-web.yml").read_text())
    example["tls_server_config"].update(cert_file=str(tls_files.server_cert),
                                        key_file=str(tls_files.server_key))
    web = load_web_config(write(tmp_path, example))
    # TLS 1.2 and up, no client certificate asked for: Prometheus authenticates by password
    assert web.ssl_context is not None
    assert web.ssl_context.verify_mode == ssl.CERT_NONE
    assert web.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert list(web.users) == ["prometheus"]


@pytest.mark.parametrize(("raw", "expected"), [
    (b"basic_auth_users: {}\n\xff", "expected UTF-8 text"),
    (b"basic_auth_users: {}\nbasic_auth_users: {}\n", "duplicate key 'basic_auth_users'"),
    (b"a: " + b"[" * 50_000, "nested less deeply"),
])
def test_a_hostile_web_config_file_is_a_config_error(tmp_path: Path, raw: bytes,
                                                      expected: str) -> None:
    """Issue 22: check-config gave a traceback on a non-UTF-8 file (the web config too)."""
    path = tmp_path / "web.yml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_web_config(path)
    assert caught.value.file == str(path)
