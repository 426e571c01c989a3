"""config/nginx/tts.conf, run by Debian's nginx in front of a real sidecar and the real app.

The nginx config under test is the shipped example with only its three addresses rewritten, so
what passes here is what an operator installs: gate open -> the app's 200; VRAM over 90 % ->
the sidecar answers the auth subrequest 403 -> clients get 503 + Retry-After from nginx; VRAM
back down -> 200 again.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_stack import Stack, StackOptions, free_port, http_get, wait_until

from .conftest import REPO

NGINX_DIR = REPO / "config" / "nginx"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = [pytest.mark.external, pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]


def render_nginx(prefix: Path, listen: int, app: int, sidecar: int) -> Path:
    """The shipped tts.conf with its addresses replaced, wrapped in the test template."""
    conf = (NGINX_DIR / "tts.conf").read_text()
    for pattern, new in ((r"listen 127\.0\.0\.1:8000;", f"listen 127.0.0.1:{listen};"),
                         (r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{app};"),
                         (r"server 127\.0\.0\.1:9109;", f"server 127.0.0.1:{sidecar};")):
        conf, count = re.subn(pattern, new, conf)
        assert count == 1, f"tts.conf no longer has exactly one {pattern!r}"
    tts_conf = prefix / "tts.conf"
    tts_conf.write_text(conf)
    wrapper = (NGINX_DIR / "test-nginx.conf.template").read_text()
    wrapper = wrapper.replace("{prefix}", str(prefix)).replace("{tts_conf}", str(tts_conf))
    path = prefix / "nginx.conf"
    path.write_text(wrapper)
    return path


def post_tts(url: str, text: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method="POST", data=json.dumps({"text": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def gated(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Stack, str]]:
    options = StackOptions(prometheus=False, alertmanager=False, gate_reopen_after_s=0.5,
                           exporter_overrides={"gate": {"mode": "auth_request"},
                                               "gpu": {"poll_interval_s": 0.1}},
                           app_overrides=getattr(request, "param", {}))
    with Stack(tmp_path / "stack", options) as stack:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        port = free_port()
        conf = render_nginx(prefix, port, stack.ports["app"], stack.ports["exporter"])
        proc = subprocess.Popen(
            [str(NGINX), "-c", str(conf), "-p", str(prefix),
             "-g", f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 10,
                       what="nginx proxying /healthz")
            yield stack, f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


def test_gate_closes_and_reopens_through_nginx(gated: tuple[Stack, str]) -> None:
    stack, base = gated
    status, _, body = post_tts(base + "/v1/tts", "Hello through nginx.")
    assert status == 200, body[:200]
    assert body[:4] == b"RIFF"  # the app's WAV, proxied

    stack.set_vram(0.95)
    wait_until(lambda: http_get(stack.url("exporter", "/ingress"))[0] == 403, 10,
               what="sidecar gate closed (403 in auth_request mode)")
    status, headers, body = post_tts(base + "/v1/tts", "Refused at the proxy.")
    assert status == 503
    assert headers.get("Retry-After") == "5"
    assert json.loads(body)["error"]["message"] == "GPU memory is high; retry later"  # nginx's

    stack.set_vram(0.40)
    wait_until(lambda: http_get(stack.url("exporter", "/ingress"))[0] == 200, 10,
               what="sidecar gate reopened")
    status, _, body = post_tts(base + "/v1/tts", "Welcome back.")
    assert status == 200, body[:200]


def post_from(source: str, url: str, headers: dict[str, str]) -> int:
    """POST /v1/tts from the local address ``source`` (a distinct client on one host)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30,
                                            source_address=(source, 0))
    try:
        connection.request("POST", "/v1/tts", body=json.dumps({"text": "Who?"}),
                           headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.parametrize("gated", [{"admission": {"rate_limit": {"rate_per_s": 0.01,
                                                                  "burst": 2}}}], indirect=True)
def test_behind_nginx_the_client_address_is_the_identity(gated: tuple[Stack, str]) -> None:
    _stack, base = gated
    # fresh identity claims per request: nginx drops X-Client-ID, the app takes the address
    # nginx appended to X-Forwarded-For, so they are one client
    statuses = [post_from("127.0.0.2", base, {"X-Client-ID": f"fresh-{i}",
                                              "X-Forwarded-For": f"198.51.100.{i}"})
                for i in range(4)]
    assert statuses == [200, 200, 429, 429]
    assert post_from("127.0.0.3", base, {}) == 200      # another address, another client
