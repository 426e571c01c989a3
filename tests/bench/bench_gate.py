"""How fast the ingress gate shuts when VRAM crosses 90 %, measured on the real sidecar process,
and compared in the same run with the alert path through real Prometheus and Alertmanager.

    python tests/bench/bench_gate.py           # 200 local crossings, then 3 through the alert path
    python tests/bench/bench_gate.py --quick   # 20 local, 1 alert crossing, short intervals

Local path: the ``file:`` GPU source goes from 0.50 to 0.95; the time until ``GET /ingress``
answers 503 *and* the gate file says closed (whichever comes last), at the default 250 ms poll.
Between crossings VRAM goes back to 0.50 and the gate reopens (``reopen_after_s`` small). The
moment of each crossing is offset randomly against the poll, as a real crossing would be.

Alert path: the same crossing, until ``alert:TTSGpuMemoryHigh`` shows up in ``GET /ingress``:
Prometheus scrapes the sidecar, evaluates the shipped rule (its ``for:`` included), sends to
Alertmanager, whose webhook reaches the sidecar. Rule and routing come from the shipped
``alerts/tts.rules.yaml`` and ``config/alertmanager.yml`` (fallbacks when absent); only
addresses, paths and, with ``--quick``, intervals are changed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.support.local_stack import (  # noqa: E402
    Process,
    free_port,
    http_get,
    wait_until,
    write_gpu_file,
)

ALERT = "TTSGpuMemoryHigh"
FALLBACK_RULE: dict[str, Any] = {
    "alert": ALERT,
    "expr": "max by (gpu, instance) (tts_gpu_memory_used_bytes / tts_gpu_memory_total_bytes)"
            " > 0.90",
    "for": "30s", "labels": {"action": "close_ingress"}}
TOKEN = "bench-token"


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return (f"n={len(ordered)} p50={statistics.median(ordered) * 1000:.0f} ms "
            f"p99={pick(0.99) * 1000:.0f} ms max={ordered[-1] * 1000:.0f} ms "
            f"mean={statistics.fmean(ordered) * 1000:.0f} ms")


class Bench:
    """One sidecar, and on demand Prometheus + Alertmanager, under one temp dir."""

    def __init__(self, workdir: Path, reopen_after_s: float) -> None:
        self.workdir = workdir
        self.ports = {n: free_port() for n in ("exporter", "prometheus", "alertmanager")}
        self.gpu_file = workdir / "gpu.json"
        self.gate_file = workdir / "state" / "ingress.json"
        self.token_file = workdir / "token"
        self.token_file.write_text(TOKEN + "\n")
        (workdir / "logs").mkdir()
        write_gpu_file(self.gpu_file, 0.50)
        self.exporter_config = {
            "server": {"listen": f"127.0.0.1:{self.ports['exporter']}"},
            "logs": {"paths": [str(workdir / "logs" / "*.log")],
                     "checkpoint_path": str(workdir / "state" / "offsets.json")},
            "gpu": {"source": f"file:{self.gpu_file}"},  # default poll interval
            "gate": {"gate_file": str(self.gate_file), "reopen_after_s": reopen_after_s},
            "auth": {"bearer_token_file": str(self.token_file)},
        }
        config = workdir / "exporter.yaml"
        config.write_text(yaml.safe_dump(self.exporter_config))
        self.sidecar = Process(
            "exporter", [sys.executable, "-m", "exporter", "--config", str(config)],
            self.url("exporter", "/healthz"), workdir / "exporter.out", REPO)
        self.processes: list[Any] = []

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def start(self, processes: list[Any]) -> None:
        for process in processes:
            self.processes.append(process)
            process.start()
        for process in processes:
            process.wait_ready(timeout=30)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    # --- observing the gate

    def ingress(self) -> dict[str, Any]:
        status, body = http_get(self.url("exporter", "/ingress"))
        data: dict[str, Any] = json.loads(body)
        data["status"] = status
        return data

    def file_open(self) -> bool:
        return bool(json.loads(self.gate_file.read_text())["open"])

    def wait_open(self) -> None:
        wait_until(lambda: self.ingress()["status"] == 200 and self.file_open(),
                   timeout=120, interval=0.005, what="the gate to reopen")

    def local_crossing(self) -> float:
        """Cross 90 %; seconds until /ingress says 503 and the gate file says closed."""
        crossed = time.monotonic()
        write_gpu_file(self.gpu_file, 0.95)
        http_closed = file_closed = None
        while http_closed is None or file_closed is None:
            if file_closed is None and not self.file_open():
                file_closed = time.monotonic()
            if http_closed is None and self.ingress()["status"] == 503:
                http_closed = time.monotonic()
            if time.monotonic() - crossed > 10:
                raise TimeoutError("the gate did not close within 10 s")
            time.sleep(0.001)
        return max(http_closed, file_closed) - crossed

    # --- Prometheus + Alertmanager

    def alert_rules(self, rule_for: str | None, interval: str) -> dict[str, Any]:
        """The shipped alert and the recording rules it reads, as one group."""
        path = REPO / "alerts" / "tts.rules.yaml"
        shipped = yaml.safe_load(path.read_text()) if path.exists() else {"groups": []}
        rules = [r for g in shipped["groups"] for r in g["rules"]]
        alert = next((r for r in rules if r.get("alert") == ALERT), FALLBACK_RULE)
        needed = [r for r in rules if "record" in r and
                  re.search(rf"(?<![\w:]){re.escape(r['record'])}(?![\w:])", alert["expr"])]
        alert = {k: v for k, v in alert.items() if k != "annotations"}
        if rule_for is not None:
            alert["for"] = rule_for
        return {"groups": [{"name": "bench", "interval": interval, "rules": [*needed, alert]}]}

    def gate_route(self, group_wait: str | None) -> dict[str, Any]:
        """Alertmanager's route for action="close_ingress" alerts, as shipped."""
        route: dict[str, Any] = {"group_wait": "0s", "group_interval": "10s"}
        path = REPO / "config" / "alertmanager.yml"
        if path.exists():
            shipped = yaml.safe_load(path.read_text())["route"]
            for child in shipped.get("routes", []):
                if any("close_ingress" in m for m in child.get("matchers", [])):
                    route = {k: child[k] for k in ("group_by", "group_wait", "group_interval",
                                                   "repeat_interval") if k in child}
        if group_wait is not None:
            route["group_wait"] = route["group_interval"] = group_wait
        route.setdefault("group_by", ["alertname", "instance", "gpu"])
        return route

    def start_alerting(self, scrape: str, rule_for: str | None, group_wait: str | None) \
            -> dict[str, Any]:
        prom_dir, am_dir = self.workdir / "prometheus", self.workdir / "alertmanager"
        prom_dir.mkdir()
        am_dir.mkdir()
        rules = self.alert_rules(rule_for, scrape)
        (prom_dir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        prometheus = {
            "global": {"scrape_interval": scrape, "evaluation_interval": scrape},
            "rule_files": [str(prom_dir / "rules.yaml")],
            "alerting": {"alertmanagers": [{"static_configs": [
                {"targets": [f"127.0.0.1:{self.ports['alertmanager']}"]}]}]},
            "scrape_configs": [{"job_name": "tts-exporter", "static_configs": [
                {"targets": [f"127.0.0.1:{self.ports['exporter']}"]}]}],
        }
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(prometheus, sort_keys=False))
        route = {"receiver": "gate", **self.gate_route(group_wait)}
        alertmanager = {"route": route, "receivers": [{"name": "gate", "webhook_configs": [{
            "url": self.url("exporter", "/alertmanager"), "send_resolved": True,
            "http_config": {"authorization": {"type": "Bearer",
                                              "credentials_file": str(self.token_file)}}}]}]}
        (am_dir / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager, sort_keys=False))
        self.start([
            Process("prometheus", [
                "prometheus", f"--config.file={prom_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}", "--log.level=warn"],
                self.url("prometheus", "/-/ready"), self.workdir / "prometheus.out", REPO),
            Process("alertmanager", [
                "prometheus-alertmanager", f"--config.file={am_dir / 'alertmanager.yml'}",
                f"--storage.path={am_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                "--cluster.listen-address=", "--log.level=warn"],
                self.url("alertmanager", "/-/ready"), self.workdir / "alertmanager.out", REPO),
        ])
        return {"prometheus": prometheus["global"], "rules": rules["groups"][0]["rules"],
                "alertmanager_route": route}

    def alert_crossing(self) -> tuple[float, float]:
        """Cross 90 %; seconds until the local gate closed, and until the alert reason came."""
        local = self.local_crossing()
        crossed = time.monotonic() - local
        wait_until(lambda: f"alert:{ALERT}" in self.ingress()["reasons"], timeout=300,
                   interval=0.05, what="the alert reason")
        return local, time.monotonic() - crossed


def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    bench = Bench(workdir, reopen_after_s=0.05)
    rng = random.Random(7)
    try:
        bench.start([bench.sidecar])
        print(f"sidecar: python -m exporter, gpu.source file:, poll_interval_s 0.25 (default), "
              f"close_at 0.90, reopen_below 0.85, reopen_after_s 0.05; workdir {workdir}")

        local: list[float] = []
        for _ in range(args.crossings):
            write_gpu_file(bench.gpu_file, 0.50)
            bench.wait_open()
            time.sleep(rng.uniform(0.0, 0.25))  # any phase against the 250 ms poll
            local.append(bench.local_crossing())
        print(f"\nlocal gate, crossing -> /ingress 503 and gate file closed: {percentiles(local)}")

        if args.alert_crossings <= 0:
            return
        if not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")):
            print("alert path skipped: prometheus / prometheus-alertmanager not installed")
            return
        write_gpu_file(bench.gpu_file, 0.50)
        bench.wait_open()
        used = bench.start_alerting(args.scrape, args.rule_for, args.group_wait)
        print("\nalert path configs:")
        print(f"  prometheus global: {used['prometheus']}")
        for rule in used["rules"]:
            print(f"  rule: {json.dumps(rule)}")
        print(f"  alertmanager route (close_ingress): {used['alertmanager_route']}")
        time.sleep(rng.uniform(0.0, 2.0))
        pairs = []
        for i in range(args.alert_crossings):
            write_gpu_file(bench.gpu_file, 0.50)
            wait_until(lambda: not bench.ingress()["reasons"], timeout=600, interval=0.1,
                       what="the alert to resolve and the gate to reopen")
            time.sleep(rng.uniform(0.0, 5.0))
            pair = bench.alert_crossing()
            pairs.append(pair)
            print(f"  crossing {i + 1}: local gate {pair[0] * 1000:.0f} ms, alert reason "
                  f"{pair[1]:.1f} s", flush=True)
        print(f"\nsame run, alert path crossings: local gate {percentiles([p[0] for p in pairs])}")
        print(f"                                 alert path {percentiles([p[1] for p in pairs])}")
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="20 local crossings; 1 alert crossing with 1 s scrape/eval, "
                             "for 2s, group_wait 1s")
    parser.add_argument("--crossings", type=int, help="local crossings (default 200)")
    parser.add_argument("--alert-crossings", type=int, help="alert-path crossings (default 3)")
    args = parser.parse_args(argv)
    if args.quick:
        args.crossings = args.crossings or 20
        args.alert_crossings = 1 if args.alert_crossings is None else args.alert_crossings
        args.scrape, args.rule_for, args.group_wait = "1s", "2s", "1s"
    else:
        args.crossings = args.crossings or 200
        args.alert_crossings = 3 if args.alert_crossings is None else args.alert_crossings
        args.scrape, args.rule_for, args.group_wait = "15s", None, None
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
