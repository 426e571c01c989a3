"""The gateway layer with real nginx (config/nginx/tts.conf) in front of the real app and a
real sidecar tailing nginx's access log (issue 18 finding 1): the app stopped -> 502s, an
upstream slower than proxy_read_timeout -> 504s, a client that gives up -> 499, each counted
in tts_gateway_requests_total; one request id in nginx's line and the app's, joined at the
sidecar's /requests/{id}."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.local_stack import Stack, StackOptions, free_port, http_get, wait_until

from .conftest import NGINX, post_tts, run_nginx

pytestmark = [pytest.mark.external, pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]

GATEWAY_LOG = "gateway.access.log"
SLEEP_S = 4.0


def gateway_counts(stack: Stack) -> dict[tuple[str, str], float]:
    _, body = http_get(stack.url("exporter", "/metrics"))
    return {(s.labels["code"], s.labels["upstream_code"]): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples if s.name == "tts_gateway_requests_total"}


def wait_for_count(stack: Stack, key: tuple[str, str], count: float) -> None:
    wait_until(lambda: gateway_counts(stack).get(key) == count, 15,
               what=f"tts_gateway_requests_total{key} == {count}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    options = StackOptions(prometheus=False, alertmanager=False, exporter_overrides={
        "gate": {"mode": "auth_request"},
        "logs": {"sources": [{"paths": [str(tmp_path / "stack" / "logs" / GATEWAY_LOG)],
                              "format": "gateway"}], "poll_interval_s": 0.2}})
    with Stack(tmp_path / "stack", options) as running:
        yield running


class _Sleeper(BaseHTTPRequestHandler):
    """An upstream that answers /healthz at once and anything else after SLEEP_S."""

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        if self.path != "/healthz":
            time.sleep(SLEEP_S)
        self._answer()

    def _answer(self) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except OSError:                 # nginx gave up on us first: what the test wants
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sleeper() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sleeper)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_one_request_id_from_nginx_through_the_app_and_502_when_the_app_is_down(
        stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    with run_nginx(tmp_path / "nginx", port, stack.ports["app"], stack.ports["exporter"],
                   stack.workdir / "logs"):
        status, headers, body = post_tts(f"http://127.0.0.1:{port}/v1/tts", "Hello, gateway.")
        assert status == 200, body[:200]
        wait_for_count(stack, ("200", "200"), 2)        # run_nginx's /healthz, then the POST
        line = json.loads((stack.workdir / "logs" / GATEWAY_LOG).read_text().splitlines()[-1])
        request_id = line["request_id"]
        assert headers.get("X-Request-ID") == request_id        # the app adopted nginx's id

        def events() -> list[str]:
            _, timeline = http_get(stack.url("exporter", f"/requests/{request_id}"))
            return [r["event"] for r in json.loads(timeline)["records"]]

        # the app's lines reach its log within its writer's flush interval
        wait_until(lambda: {"gateway_request", "synthesis_complete"} <= set(events()), 10,
                   what="the gateway's and the app's records under one request id")

        stack.processes["app"].stop()
        for _ in range(3):
            assert post_tts(f"http://127.0.0.1:{port}/v1/tts", "Anyone there?")[0] == 502
        wait_for_count(stack, ("502", "502"), 3)


def test_504_past_proxy_read_timeout_and_499_when_the_client_gives_up(
        stack: Stack, sleeper: int, tmp_path: Path) -> None:
    port = free_port()
    with run_nginx(tmp_path / "nginx", port, sleeper, stack.ports["exporter"],
                   stack.workdir / "logs", read_timeout_s=1):
        assert post_tts(f"http://127.0.0.1:{port}/v1/tts", "Too slow.")[0] == 504
        wait_for_count(stack, ("504", "504"), 1)

        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"POST /v1/tts HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 2\r\n\r\n{}")
            time.sleep(0.3)             # nginx is waiting on the upstream now
        wait_for_count(stack, ("499", "none"), 1)
        _, body = http_get(stack.url("exporter", "/metrics"))
        assert b"tts_gateway_empty_responses_total 1.0" in body      # the 499's
        lines = (stack.workdir / "logs" / GATEWAY_LOG).read_text().splitlines()
        assert len(lines) == 3                                      # /healthz, 504, 499
        assert b"tts_gateway_request_duration_seconds_count 3.0" in body
