"""Run the whole tts-sentinel stack on 127.0.0.1: app, sidecar, Prometheus, Alertmanager.

One place that knows how the shipped configs fit together, used by ``make run`` (the demo) and
by the end-to-end tests, so what the tests prove is what a person starts:

    python config/local_stack.py              # demo: start everything, send traffic, print URLs
    python config/local_stack.py --no-prom    # app + sidecar only

Every process listens on a free loopback port and writes under one work directory. The shipped
configs (``config/*.yaml``, ``alerts/tts.rules.yaml``) are loaded and only the environment-
specific parts are rewritten: ports, paths, and (for tests) intervals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET returning (status, body) for any HTTP status; raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_gpu_file(path: Path, used_ratio: float, gpus: int = 1, total: int = 24 * GIB) -> None:
    """Write the sidecar's ``file:`` GPU source atomically: every GPU at ``used_ratio``."""
    payload = {"gpus": [{"index": i, "uuid": f"GPU-demo-{i:04d}", "name": "Simulated L4",
                         "memory_used_bytes": int(total * used_ratio),
                         "memory_total_bytes": total,
                         "utilization_ratio": min(1.0, used_ratio),
                         "temperature_celsius": 40 + 40 * used_ratio,
                         "power_watts": 30 + 60 * used_ratio} for i in range(gpus)]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


@dataclass
class Process:
    """A child process with its own log file and an HTTP readiness check."""

    name: str
    argv: list[str]
    ready_url: str
    log_path: Path
    cwd: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.argv, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; see "
                                   f"{self.log_path}:\n{self.log_tail()}")
            return http_get(self.ready_url, timeout=1.0)[0] < 500

        wait_until(ready, timeout, what=f"{self.name} at {self.ready_url}")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)


@dataclass
class StackOptions:
    """What to start and how fast Prometheus/Alertmanager run (tests shorten everything)."""

    prometheus: bool = True
    alertmanager: bool = True
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    max_alert_for: str | None = None
    group_wait: str | None = None
    gate_reopen_after_s: float | None = None
    app_overrides: dict[str, Any] = field(default_factory=dict)
    exporter_overrides: dict[str, Any] = field(default_factory=dict)


class Stack:
    """Writes configs under ``workdir``, starts the processes, and stops them all."""

    def __init__(self, workdir: Path, options: StackOptions | None = None) -> None:
        self.workdir = workdir.resolve()
        self.options = options or StackOptions()
        self.ports = {name: free_port() for name in
                      ("app", "exporter", "prometheus", "alertmanager", "am_cluster", "pager")}
        self.token = "demo-" + "".join(random.choices("abcdefghijkmnpqrstuvwxyz23456789", k=24))
        self.processes: dict[str, Process] = {}
        for sub in ("logs", "state", "cache", "prometheus", "alertmanager"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.gpu_file = self.workdir / "gpu.json"
        self.gate_file = self.workdir / "state" / "ingress.json"
        self.token_file = self.workdir / "state" / "webhook-token"
        self.token_file.write_text(self.token + "\n")
        self.set_vram(0.40)

    # --- URLs
    def url(self, name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    # --- the simulated GPU (the sidecar's `file:` source)
    def set_vram(self, used_ratio: float, gpus: int = 1) -> None:
        write_gpu_file(self.gpu_file, used_ratio, gpus)

    # --- configs
    def write_app_config(self) -> Path:
        base = yaml.safe_load((REPO / "config" / "app.yaml").read_text()) or {}
        override = deep_merge(self.app_environment(), self.options.app_overrides)
        path = self.workdir / "app.yaml"
        path.write_text(yaml.safe_dump(deep_merge(base, override), sort_keys=False))
        return path

    def app_environment(self) -> dict[str, Any]:
        return {
            "server": {"listen": f"127.0.0.1:{self.ports['app']}"},
            "log": {"path": str(self.workdir / "logs" / "tts-app.log")},
            "cache": {"dir": str(self.workdir / "cache")},
            "gate": {"file": str(self.gate_file)},
        }

    def write_exporter_config(self) -> Path:
        base = yaml.safe_load((REPO / "config" / "exporter.yaml").read_text()) or {}
        gate: dict[str, Any] = {"gate_file": str(self.gate_file)}
        if self.options.gate_reopen_after_s is not None:
            gate["reopen_after_s"] = self.options.gate_reopen_after_s
        override = {
            "server": {"listen": f"127.0.0.1:{self.ports['exporter']}"},
            "logs": {"paths": [str(self.workdir / "logs" / "*.log")],
                     "checkpoint_path": str(self.workdir / "state" / "exporter-offsets.json")},
            # The espeak app holds no GPU (gpu.devices: auto would then watch none): the
            # simulated one is watched regardless, so the VRAM drill closes the gate.
            "gpu": {"source": f"file:{self.gpu_file}", "devices": "all"},
            "gate": gate,
            "auth": {"bearer_token_file": str(self.token_file)},
            "disk": {"paths": [str(self.workdir / "cache")]},
            "probe": {"url": self.url("app", "/status")},
        }
        merged = deep_merge(deep_merge(base, override), self.options.exporter_overrides)
        path = self.workdir / "exporter.yaml"
        path.write_text(yaml.safe_dump(merged, sort_keys=False))
        return path

    def write_rules(self) -> Path:
        """The shipped rules; with ``max_alert_for`` every ``for:`` is capped (tests only —
        alert timing is covered by the promtool unit tests, this proves the expressions)."""
        rules = yaml.safe_load((REPO / "alerts" / "tts.rules.yaml").read_text())
        cap = self.options.max_alert_for
        if cap is not None:
            cap_s = _seconds(cap)
            for group in rules["groups"]:
                group["interval"] = self.options.evaluation_interval
                for rule in group["rules"]:
                    if "for" in rule and _seconds(rule["for"]) > cap_s:
                        rule["for"] = cap
        path = self.workdir / "prometheus" / "tts.rules.yaml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        return path

    def write_prometheus_config(self) -> Path:
        config = yaml.safe_load((REPO / "config" / "prometheus.yml").read_text())
        config.setdefault("global", {}).update(
            scrape_interval=self.options.scrape_interval,
            evaluation_interval=self.options.evaluation_interval)
        config["rule_files"] = [str(self.write_rules())]
        targets = {"tts-exporter": f"127.0.0.1:{self.ports['exporter']}",
                   "prometheus": f"127.0.0.1:{self.ports['prometheus']}"}
        for job in config.get("scrape_configs", []):
            if job["job_name"] in targets:
                job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        config["alerting"] = {"alertmanagers": [{"static_configs": [
            {"targets": [f"127.0.0.1:{self.ports['alertmanager']}"]}]}]}
        path = self.workdir / "prometheus" / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def write_alertmanager_config(self) -> Path:
        config = yaml.safe_load((REPO / "config" / "alertmanager.yml").read_text())
        for receiver in config.get("receivers", []):
            for hook in receiver.get("webhook_configs", []):
                if hook.get("url", "").rstrip("/").endswith("/alertmanager"):
                    hook["url"] = self.url("exporter", "/alertmanager")
                    hook.setdefault("http_config", {})["authorization"] = {
                        "type": "Bearer", "credentials_file": str(self.token_file)}
                else:
                    hook["url"] = self.url("pager", "/page")
        if self.options.group_wait is not None:
            _shorten_routes(config["route"], self.options.group_wait)
        path = self.workdir / "alertmanager" / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # --- lifecycle
    def start(self) -> None:
        python = sys.executable
        # Ready means serving: the app warmed up (/readyz), the gate's first GPU reading in and
        # the gate open (/ingress answers 503 until then; 404 when the gate is disabled).
        self._add("app", [python, "-m", "tts_app", "--config", str(self.write_app_config())],
                  self.url("app", "/readyz"))
        self._add("exporter", [python, "-m", "exporter", "--config",
                               str(self.write_exporter_config())], self.url("exporter", "/ingress"))
        if self.options.prometheus and shutil.which("prometheus"):
            self._add("prometheus", [
                "prometheus", f"--config.file={self.write_prometheus_config()}",
                f"--storage.tsdb.path={self.workdir / 'prometheus' / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
                "--web.enable-lifecycle", "--log.level=warn"], self.url("prometheus", "/-/ready"))
        if self.options.alertmanager and shutil.which("prometheus-alertmanager"):
            self._add("alertmanager", [
                "prometheus-alertmanager", f"--config.file={self.write_alertmanager_config()}",
                f"--storage.path={self.workdir / 'alertmanager' / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                "--cluster.listen-address=", "--log.level=warn"],
                self.url("alertmanager", "/-/ready"))
        try:
            for process in self.processes.values():
                process.start()
            for process in self.processes.values():
                process.wait_ready(timeout=120 if process.name == "app" else 30)
        except BaseException:
            self.stop()
            raise

    def _add(self, name: str, argv: list[str], ready_url: str) -> None:
        self.processes[name] = Process(name, argv, ready_url,
                                       self.workdir / f"{name}.out", REPO)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- traffic
    def synthesize(self, text: str, voice: str | None = None, timeout: float = 60.0) \
            -> tuple[int, dict[str, str], bytes]:
        body: dict[str, Any] = {"text": text}
        if voice:
            body["voice"] = voice
        request = urllib.request.Request(self.url("app", "/v1/tts"), method="POST",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query against the stack's Prometheus; the result vector."""
        url = self.url("prometheus", "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        status, body = http_get(url, timeout=5)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {payload}")
        return list(payload["data"]["result"])


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", str(duration)):
        total += float(number) * units[unit]
    return total


def _shorten_routes(route: dict[str, Any], group_wait: str) -> None:
    route["group_wait"] = group_wait
    route["group_interval"] = group_wait
    for child in route.get("routes", []):
        _shorten_routes(child, group_wait)


DEMO_TEXTS = [
    "Hello from tts-sentinel.", "The quick brown fox jumps over the lazy dog.",
    "Your order has shipped and will arrive tomorrow.", "今天天气真好。",
    "Please hold, an agent will be with you shortly.", "Good morning! Here is the news.",
]


LIVE_METRICS = {
    "requests": "tts_http_requests_total",
    "syntheses": "tts_syntheses_total",
    "cache hits": "tts_cache_hits_total",
    "log lines": "tts_exporter_log_lines_total",
    "ingress open": "tts_ingress_open",
}


def live_summary(stack: Stack) -> str:
    """A one-line reading of the sidecar's /metrics, summed over labels."""
    _, body = http_get(stack.url("exporter", "/metrics"))
    totals = dict.fromkeys(LIVE_METRICS.values(), 0.0)
    for line in body.decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return ", ".join(f"{label} {totals[name]:g}" for label, name in LIVE_METRICS.items())


def demo(workdir: Path, options: StackOptions, duration: float | None) -> None:
    """Start the stack, keep a gentle stream of requests going, print where to look."""
    with Stack(workdir, options) as stack:
        print("\ntts-sentinel demo is up:")
        print(f"  app        {stack.url('app', '/v1/tts')}  (POST {{\"text\": \"hello\"}})")
        print(f"  sidecar    {stack.url('exporter', '/metrics')}")
        print(f"  gate       {stack.url('exporter', '/ingress')}")
        if "prometheus" in stack.processes:
            print(f"  prometheus {stack.url('prometheus', '/alerts')}")
        if "alertmanager" in stack.processes:
            print(f"  alertmgr   {stack.url('alertmanager', '/')}")
        print(f"  GPU drill  python config/local_stack.py --workdir {workdir} --set-vram 0.95")
        print(f"  logs       {workdir / 'logs'}\nCtrl-C stops everything.\n")
        deadline = None if duration is None else time.monotonic() + duration
        served = 0
        with contextlib.suppress(KeyboardInterrupt):
            while deadline is None or time.monotonic() < deadline:
                status, _, _ = stack.synthesize(random.choice(DEMO_TEXTS))
                served += 1
                if served % 10 == 0:
                    print(f"  sent {served} (last {status}) | sidecar: {live_summary(stack)}")
                time.sleep(random.uniform(0.2, 1.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "run" / "demo")
    parser.add_argument("--no-prom", action="store_true", help="app + sidecar only")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--set-vram", type=float, metavar="RATIO",
                        help="drill: set the running demo's simulated VRAM ratio and exit")
    args = parser.parse_args(argv)
    if args.set_vram is not None:
        write_gpu_file(args.workdir.resolve() / "gpu.json", args.set_vram)
        print(f"simulated VRAM set to {args.set_vram:.0%}")
        return 0
    options = StackOptions(prometheus=not args.no_prom, alertmanager=not args.no_prom,
                           scrape_interval="5s", evaluation_interval="5s")
    demo(args.workdir, options, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
