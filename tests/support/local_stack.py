"""Run the whole tts-sentinel stack on 127.0.0.1: app, sidecar, Prometheus, Alertmanager.

One place that knows how the shipped configs fit together, used by ``make run`` (the demo) and
by the end-to-end tests, so what the tests prove is what a person starts:

    .venv/bin/python -m tests.support.local_stack            # the demo: traffic, where to look
    .venv/bin/python -m tests.support.local_stack --no-prom  # app + sidecar only

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from config.kubernetes.gen_manifests import deep_merge

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
# How long children get after SIGTERM before SIGKILL: the demo app drains in well under this.
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, signum: int) -> None:
        """Signal the child's process group (its own session), so what it started goes too.
        Only while the child is unreaped: until then its pid, the group's id, is not reused."""
        if self.popen is not None and self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        stop_all([self], timeout)
        return None if self.popen is None else self.popen.returncode


def stop_all(processes: Sequence[Process], timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGTERM every process group at once, give them ``timeout`` seconds together, then SIGKILL
    the groups still running. Returns the names of those that had to be killed."""
    running = [process for process in processes if process.running()]
    for process in running:
        process.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        assert process.popen is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(max(0.0, deadline - time.monotonic()))
    killed = [process for process in running if process.running()]
    for process in killed:
        assert process.popen is not None
        process.signal_group(signal.SIGKILL)
        process.popen.wait()
    return [process.name for process in killed]


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

    def __init__(self, workdir: Path, options: StackOptions | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir.resolve()
        self.options = options or StackOptions()
        self.say = say  # where stopping is announced (the demo prints; tests stay quiet)
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
            "logs": {"paths": [str(self.workdir / "logs" / "*.log*")],
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

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> list[str]:
        """Stop every child (see :func:`stop_all`); the names of those killed."""
        running = [p for p in reversed(self.processes.values()) if p.running()]
        if running and self.say:
            self.say(f"stopping {', '.join(p.name for p in running)} "
                     f"(SIGTERM; SIGKILL after {timeout:g} s)")
        started = time.monotonic()
        killed = stop_all(running, timeout)
        if running and self.say:
            if killed:
                self.say(f"  {', '.join(killed)} did not stop within {timeout:g} s: killed")
            self.say(f"stopped in {time.monotonic() - started:.1f} s")
        return killed

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
# Requests the stack makes itself (the sidecar's probe, readiness checks), not the demo traffic.
PROBE_ROUTES = frozenset({"/status", "/healthz", "/readyz"})
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def live_totals(stack: Stack) -> dict[str, float]:
    """The sidecar's /metrics, summed over labels, without the requests the stack makes itself."""
    _, body = http_get(stack.url("exporter", "/metrics"))
    totals = dict.fromkeys(LIVE_METRICS.values(), 0.0)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("route") not in PROBE_ROUTES:
                totals[sample.name] += sample.value
    return totals


def live_summary(stack: Stack, since: dict[str, float] | None = None) -> str:
    """One line of :func:`live_totals`; counters counted from ``since``, an earlier reading
    (the sidecar's totals outlive its restarts, so a reused workdir starts above zero)."""
    totals = live_totals(stack)
    for name, value in (since or {}).items():
        if name.endswith("_total"):
            totals[name] -= value
    return ", ".join(f"{label} {totals[name]:g}" for label, name in LIVE_METRICS.items())


class StopSignal(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: leave whatever the demo was doing and stop."""


def _stop_on_signals() -> None:
    """Turn the stop signals into :class:`StopSignal`, once: a second one (make forwards the
    SIGTERM that ``timeout`` also sends to the group) must not cut the stop short."""
    def handler(signum: int, _: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise StopSignal(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def _shown(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to paste)."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def first_answering(stack: Stack, name: str, paths: Sequence[str]) -> str:
    """The first of ``paths`` that answers 200: Debian's Prometheus serves its alerts page at
    /classic/alerts, upstream's at /alerts."""
    for path in paths:
        with contextlib.suppress(OSError):
            if http_get(stack.url(name, path))[0] == 200:
                return stack.url(name, path)
    return stack.url(name, paths[-1])


def where_to_look(stack: Stack) -> list[str]:
    """What the demo prints once it is up: each line a URL that answers or a command to paste."""
    python = _shown(sys.executable)
    lines = [
        "  synthesize    curl -sS --fail -o hello.wav -H 'Content-Type: application/json' "
        f"-d '{{\"text\": \"hello\"}}' {stack.url('app', '/v1/tts')}",
        f"  sidecar       {stack.url('exporter', '/metrics')}",
        f"  gate          {stack.url('exporter', '/ingress')}",
    ]
    if "prometheus" in stack.processes:
        lines.append("  prometheus    "
                     + first_answering(stack, "prometheus", ["/alerts", "/classic/alerts"]))
    if "alertmanager" in stack.processes:
        # Debian's Alertmanager ships no web UI: its API, or amtool, shows the alerts.
        lines.append(f"  alertmanager  {stack.url('alertmanager', '/api/v2/alerts')}  "
                     f"(or: amtool --alertmanager.url={stack.url('alertmanager')} alert query)")
        lines.append(f"  dashboards    {_shown(REPO / 'grafana' / 'dashboards')}/*.json: import "
                     "them in a Grafana (Dashboards > Import) with a Prometheus data source at "
                     f"{stack.url('prometheus')}, or provision them with "
                     f"{_shown(REPO / 'grafana' / 'provisioning')}/")
    # `-m` finds the module from the repository root, where `make run` starts the demo
    drill = f"{python} -m tests.support.local_stack --workdir {_shown(stack.workdir)}"
    if Path.cwd() != REPO:
        drill = (f"cd {REPO} && {sys.executable} -m tests.support.local_stack "
                 f"--workdir {stack.workdir}")
    lines += [
        f"  GPU drill     {drill} --set-vram 0.95   (0.40 reopens)",
        f"  logs          {_shown(stack.workdir / 'logs')}",
    ]
    return lines


def demo(workdir: Path, options: StackOptions, duration: float | None) -> str:
    """Start the stack, say where to look, keep a gentle stream of requests going until
    ``duration`` passes or a stop signal comes; then stop every child. Returns why it stopped."""
    def say(line: str) -> None:
        print(line, flush=True)

    _stop_on_signals()
    stack = Stack(workdir, options, say=say)
    say(f"starting the stack on 127.0.0.1 (each process's output: {_shown(workdir)}/*.out)")
    reason = "--duration reached"
    try:
        stack.start()
        say("\ntts-sentinel demo is up:")
        for line in where_to_look(stack):
            say(line)
        say("Ctrl-C (or SIGTERM, SIGHUP) stops everything.\n")
        deadline = None if duration is None else time.monotonic() + duration
        before, sent = live_totals(stack), 0
        while deadline is None or time.monotonic() < deadline:
            status, _, _ = stack.synthesize(random.choice(DEMO_TEXTS))
            sent += 1
            if sent % 10 == 0:
                say(f"  sent {sent} (last {status}) | sidecar: {live_summary(stack, before)}")
            time.sleep(random.uniform(0.2, 1.0))
    except StopSignal as stop:
        reason = str(stop)
        say(f"\n{reason} received")
    finally:
        stack.stop()
    return reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.local_stack",
                                     description=__doc__,
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
