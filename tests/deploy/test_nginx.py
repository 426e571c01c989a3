"""config/nginx/tts.conf, run by Debian's nginx in front of a real sidecar and the real app.

The nginx config under test is the shipped example with only its three addresses rewritten, so
what passes here is what an operator installs: gate open -> the app's 200; VRAM over 90 % ->
the sidecar answers the auth subrequest 403 -> clients get 503 + Retry-After from nginx; VRAM
back down -> 200 again.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.local_stack import Stack, StackOptions, free_port, http_get, wait_until

from .conftest import NGINX, post_tts, run_nginx

pytestmark = [pytest.mark.external, pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]


@contextlib.contextmanager
def nginx_in_front(tmp_path: Path, gate_mode: str,
                   app_overrides: dict[str, Any]) -> Iterator[tuple[Stack, str]]:
    """The local stack with the shipped nginx config in front; the sidecar's gate in
    ``gate_mode``."""
    options = StackOptions(prometheus=False, alertmanager=False, gate_reopen_after_s=0.5,
                           exporter_overrides={"gate": {"mode": gate_mode},
                                               "gpu": {"poll_interval_s": 0.1}},
                           app_overrides=app_overrides)
    with Stack(tmp_path / "stack", options) as stack:
        port = free_port()
        with run_nginx(tmp_path / "nginx", port, stack.ports["app"], stack.ports["exporter"],
                       stack.workdir / "logs"):
            yield stack, f"http://127.0.0.1:{port}"


@pytest.fixture
def gated(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Stack, str]]:
    with nginx_in_front(tmp_path, "auth_request", getattr(request, "param", {})) as running:
        yield running


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


def test_the_shipped_nginx_gates_a_sidecar_in_readiness_mode_too(tmp_path: Path) -> None:
    """nginx's auth_request takes 2xx, 401 and 403 only: a readiness-mode 503 from the gate
    turned every /v1/tts into nginx's own 500. The shipped config asks for the proxy's answer
    (?for=auth_request), so it gates whichever mode the sidecar runs in."""
    with nginx_in_front(tmp_path, "readiness", {}) as (stack, base):
        stack.set_vram(0.95)
        wait_until(lambda: http_get(stack.url("exporter", "/ingress"))[0] == 503, 10,
                   what="sidecar gate closed (503 in readiness mode)")
        status, headers, _ = post_tts(base + "/v1/tts", "Refused at the proxy.")
        assert (status, headers.get("Retry-After")) == (503, "5")
        stack.set_vram(0.40)
        wait_until(lambda: http_get(stack.url("exporter", "/ingress"))[0] == 200, 10,
                   what="sidecar gate reopened")
        assert post_tts(base + "/v1/tts", "Welcome back.")[0] == 200


def post_from(source: str, url: str, headers: dict[str, str]) -> int:
    """POST /v1/tts from the local address ``source`` (a distinct client on one host)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None, url
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
