"""Shared helpers for the deployment tests: the repo root, the local stack orchestrator, and
the shipped nginx config run unprivileged."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.local_stack import REPO, http_get, wait_until

NGINX_DIR = REPO / "config" / "nginx"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def render_nginx(prefix: Path, listen: int, app: int, sidecar: int, log_dir: Path,
                 read_timeout_s: int | None = None) -> Path:
    """The shipped tts.conf with its addresses (and, where given, the app's read timeout)
    replaced, wrapped in the test template; its gateway log goes to ``log_dir``."""
    conf = (NGINX_DIR / "tts.conf").read_text()
    replacements = [(r"listen 127\.0\.0\.1:8000;", f"listen 127.0.0.1:{listen};"),
                    (r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{app};"),
                    (r"server 127\.0\.0\.1:9109;", f"server 127.0.0.1:{sidecar};"),
                    (r"access_log /var/log/tts/", f"access_log {log_dir}/")]
    if read_timeout_s is not None:
        replacements.append((r"proxy_read_timeout 130s;", f"proxy_read_timeout {read_timeout_s}s;"))
    for pattern, new in replacements:
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


@contextmanager
def run_nginx(prefix: Path, listen: int, app: int, sidecar: int, log_dir: Path,
              read_timeout_s: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """nginx on :func:`render_nginx`'s config, unprivileged, until the block ends."""
    assert NGINX is not None
    prefix.mkdir()
    conf = render_nginx(prefix, listen, app, sidecar, log_dir, read_timeout_s)
    proc = subprocess.Popen(
        [str(NGINX), "-c", str(conf), "-p", str(prefix),
         "-g", f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200, 10,
                   what="nginx proxying /healthz")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
