"""The real sidecar process, started with extra settings, for the integration tests."""

from __future__ import annotations

import resource
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config.kubernetes.gen_manifests import deep_merge
from tests.support.local_stack import REPO, free_port, wait_until, write_gpu_file
from tests.unit.conftest import tls_files  # noqa: F401  (the fixture, for these tests too)


class Sidecar:
    """``python -m exporter`` on a free port with extra config (``settings``, merged into the
    base), optionally more arguments, TLS (``ssl_context`` is the client side), and a lowered
    RLIMIT_NOFILE."""

    def __init__(self, workdir: Path, settings: dict[str, Any], nofile: int | None = None,
                 args: tuple[str, ...] = (), ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / "exporter.out"
        self.ssl_context = ssl_context
        (workdir / "logs").mkdir(exist_ok=True)
        write_gpu_file(workdir / "gpu.json", 0.40)
        config = deep_merge({
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "logs": {"paths": [str(workdir / "logs" / "*.log")],
                     "checkpoint_path": str(workdir / "state" / "offsets.json")},
            "gpu": {"source": f"file:{workdir / 'gpu.json'}"},
            "gate": {"gate_file": str(workdir / "state" / "ingress.json")},
        }, settings)
        path = workdir / "exporter.yaml"
        path.write_text(yaml.safe_dump(config))

        def limit_files() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "exporter", "--config", str(path), *args], cwd=REPO,
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit_files)
        wait_until(lambda: self.request("/healthz")[0] == 200, timeout=20,
                   what="the sidecar to listen")

    def url(self, path: str) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}{path}"

    def request(self, path: str, headers: dict[str, str] | None = None,
                data: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) for any HTTP status; OSError when nothing answers."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"the sidecar exited:\n{self.log.read_text(errors='replace')}")
        request = urllib.request.Request(self.url(path), data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.ssl_context) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def samples(self, name: str, headers: dict[str, str] | None = None) \
            -> dict[tuple[tuple[str, str], ...], float]:
        """The samples of one metric on /metrics, keyed by their sorted labels."""
        _, body = self.request("/metrics", headers)
        return {tuple(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples if s.name == name}

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        return int(next(line for line in status.splitlines()
                        if line.startswith("VmRSS:")).split()[1]) / 1024

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(15)


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    """Start sidecars (``Sidecar``'s arguments after the work dir); all stopped at the end."""
    started: list[Sidecar] = []

    def start(*args: Any, **kwargs: Any) -> Sidecar:
        started.append(Sidecar(tmp_path, *args, **kwargs))
        return started[-1]

    yield start
    for sidecar in started:
        sidecar.stop()
