"""The real sidecar behind an exporter-toolkit web config: TLS with verified client
certificates, and basic auth on /metrics, /requests and / while the probes' routes stay open
and the POST routes keep their bearer token."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.integration.conftest import Sidecar
from tests.unit.conftest import TlsFiles

pytestmark = pytest.mark.slow

PASSWORD = "scrape-s3cret"
TOKEN = "gate-token"


def client_context(tls: TlsFiles, with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca))
    if with_cert:
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return context


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"prometheus:{password}".encode())
            .decode()}


@pytest.fixture
def web_config(tmp_path: Path, tls_files: TlsFiles) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(tls_files.server_cert),
                              "key_file": str(tls_files.server_key),
                              "client_ca_file": str(tls_files.ca),
                              "client_auth_type": "RequireAndVerifyClientCert"},
        "basic_auth_users": {"prometheus": bcrypt.hashpw(PASSWORD.encode(),
                                                         bcrypt.gensalt(rounds=4)).decode()}}))
    return path


def test_tls_and_basic_auth_protect_exposition_but_not_the_probes(
        start_sidecar: Callable[..., Sidecar], web_config: Path, tls_files: TlsFiles) -> None:
    sidecar = start_sidecar({"auth": {"bearer_token": TOKEN}},
                            args=("--web.config.file", str(web_config)),
                            ssl_context=client_context(tls_files))
    for path in ("/metrics", "/requests", "/requests/r1", "/"):
        status, _ = sidecar.request(path)
        assert status == 401, path
        assert sidecar.request(path, basic("wrong"))[0] == 401, path
    assert sidecar.request("/metrics", basic(PASSWORD))[0] == 200
    assert sidecar.request("/requests", basic(PASSWORD))[0] == 200
    assert sidecar.request("/ingress")[0] == 200
    assert sidecar.request("/healthz")[0] == 200
    close = json.dumps({"action": "close", "reason": "drill"}).encode()
    assert sidecar.request("/ingress", {"Authorization": "Bearer wrong"}, close)[0] == 401
    status, body = sidecar.request("/ingress", {"Authorization": f"Bearer {TOKEN}"}, close)
    assert status == 200
    assert json.loads(body)["reasons"] == ["manual"]


def test_a_client_without_a_verified_certificate_cannot_connect(
        start_sidecar: Callable[..., Sidecar], web_config: Path, tls_files: TlsFiles) -> None:
    sidecar = start_sidecar({"server": {"web_config_file": str(web_config)}},
                            ssl_context=client_context(tls_files))
    sidecar.ssl_context = client_context(tls_files, with_cert=False)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        sidecar.request("/ingress")
    sidecar.ssl_context = client_context(tls_files)
    assert sidecar.request("/ingress")[0] == 200


def test_the_probe_routes_can_be_protected_too(
        start_sidecar: Callable[..., Sidecar], web_config: Path, tls_files: TlsFiles) -> None:
    sidecar = start_sidecar({"server": {"web_config_file": str(web_config),
                                        "unauthenticated_paths": ["/healthz"]}},
                            ssl_context=client_context(tls_files))
    assert sidecar.request("/ingress")[0] == 401
    assert sidecar.request("/ingress", basic(PASSWORD))[0] == 200
