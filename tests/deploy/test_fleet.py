"""Three replicas (app + sidecar each) behind one real Prometheus, on loopback.

A stand-in for a Kubernetes Deployment with three pods: each replica has its own ports, logs,
cache and gate file (tests/support/local_stack.py's Stack without Prometheus), and one Prometheus
scrapes the three sidecars with the shipped rules, each target labelled with the
namespace/pod labels the Prometheus Operator would add. One replica's VRAM crosses 90 %: only
its gate closes, the other two keep serving, the fleet view shows it, and the HPA's queries
(config/kubernetes/prometheus-adapter.yaml, templates filled in as prometheus-adapter does)
return one value per pod.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.local_stack import Process, Stack, StackOptions, free_port, http_get, wait_until

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.external,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus is not installed")]

REPLICAS = 3
NAMESPACE = "tts"


class Fleet:
    """The replicas and the Prometheus that watches them."""

    def __init__(self, replicas: list[Stack], prometheus_port: int) -> None:
        self.replicas = replicas
        self.prometheus_port = prometheus_port

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector."""
        url = (f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        status, body = http_get(url, timeout=5)
        payload = json.loads(body)
        assert status == 200, (promql, payload)
        assert payload["status"] == "success", (promql, payload)
        return list(payload["data"]["result"])


def write_prometheus(workdir: Path, port: int, replicas: list[Stack]) -> Path:
    config = yaml.safe_load((REPO / "config" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    rules = yaml.safe_load((REPO / "alerts" / "tts.rules.yaml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (workdir / "tts.rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config["rule_files"] = [str(workdir / "tts.rules.yaml")]
    config.pop("alerting", None)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tts-exporter")
    job["static_configs"] = [
        {"targets": [f"127.0.0.1:{stack.ports['exporter']}"],
         "labels": {"namespace": NAMESPACE, "pod": f"tts-{i}"}}
        for i, stack in enumerate(replicas)]
    config["scrape_configs"] = [job]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    replicas = [Stack(root / f"replica-{i}", StackOptions(
        prometheus=False, alertmanager=False,
        exporter_overrides={"gpu": {"poll_interval_s": 0.1}})) for i in range(REPLICAS)]
    prom_dir = root / "prometheus"
    prom_dir.mkdir()
    with contextlib.ExitStack() as stop:
        for stack in replicas:
            stack.start()
            stop.callback(stack.stop)
        port = free_port()
        prom = Process("prometheus", [
            "prometheus", f"--config.file={write_prometheus(prom_dir, port, replicas)}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            f"http://127.0.0.1:{port}/-/ready", prom_dir / "prometheus.out", REPO)
        prom.start()
        stop.callback(prom.stop)
        prom.wait_ready(30)
        yield Fleet(replicas, port)


def adapter_queries() -> dict[str, str]:
    """The adapter's metricsQuery per exposed metric, placeholders filled for our pods."""
    doc = next(d for d in yaml.safe_load_all(
        (REPO / "config" / "kubernetes" / "prometheus-adapter.yaml").read_text()) if d)
    pods = "|".join(f"tts-{i}" for i in range(REPLICAS))
    queries = {}
    for rule in yaml.safe_load(doc["data"]["config.yaml"])["rules"]:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"].strip("'"))
        assert series is not None
        query = (rule["metricsQuery"]
                 .replace("<<.Series>>", series.group(1))
                 .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{pods}"')
                 .replace("<<.GroupBy>>", "pod"))
        assert "<<" not in query, query
        queries[rule["name"]["as"]] = query
    return queries


def by_pod(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"].get("pod", ""): float(s["value"][1]) for s in result}


def test_one_hot_replica_leaves_the_fleet_alone(fleet: Fleet) -> None:
    hot, others = fleet.replicas[0], fleet.replicas[1:]
    for round_ in range(3):
        for stack in fleet.replicas:
            status, _, body = stack.synthesize(f"Fleet request {round_}.")
            assert status == 200, body[:200]
    query = fleet.query
    wait_until(lambda: len(query('tts_ingress_open{job="tts-exporter"} == 1')) == REPLICAS, 20,
               what="all three sidecars scraped with the gate open")

    hot.set_vram(0.95)
    wait_until(lambda: http_get(hot.url("exporter", "/ingress"))[0] == 503, 10,
               what="hot replica's gate closed")
    for stack in others:
        assert http_get(stack.url("exporter", "/ingress"))[0] == 200
        status, _, body = stack.synthesize("Still serving.")
        assert status == 200, body[:200]
    # The app reads the gate file too (for clients that bypass the Service/nginx).
    refused = wait_until(lambda: (r := hot.synthesize("Refused."))[0] == 503 and r, 5,
                         what="hot app refusing")
    assert "Retry-After" in refused[1]

    # The fleet view: exactly one replica closed, and which one; fleet VRAM max is the hot one.
    closed = wait_until(lambda: query('tts_ingress_open{job="tts-exporter"} == 0'), 15,
                        what="Prometheus seeing the closed gate")
    assert [s["metric"]["pod"] for s in closed] == ["tts-0"]
    assert float(query('count(tts_ingress_open{job="tts-exporter"} == 0)')[0]["value"][1]) == 1
    vram_max = wait_until(lambda: [s for s in query("max(gpu:tts_gpu_memory_used:ratio)")
                                   if float(s["value"][1]) > 0.9], 10, what="fleet VRAM max")
    assert float(vram_max[0]["value"][1]) == pytest.approx(0.95, abs=0.01)
    assert set(by_pod(query("gpu:tts_gpu_memory_used:ratio >= 0.90"))) == {"tts-0"}


def test_hpa_queries_return_a_value_per_replica(fleet: Fleet) -> None:
    queries = adapter_queries()
    assert set(queries) == {"tts_http_request_p99_seconds", "tts_requests_waiting"}
    pods = {f"tts-{i}" for i in range(REPLICAS)}

    def requests() -> None:
        # Every replica, whatever earlier tests did: a latency counts whether the request was
        # served or, on a replica whose gate another test closed, refused.
        for stack in fleet.replicas:
            status = stack.synthesize("Autoscaling signal.")[0]
            assert status == 200 or (status == 503 and stack is fleet.replicas[0]), status

    # rate() sees no increase in a series' first sample: a second round once the first is
    # scraped gives every pod one.
    requests()
    latency = queries["tts_http_request_p99_seconds"]
    wait_until(lambda: set(by_pod(fleet.query(latency))) == pods, 20, what="a series per pod")
    requests()
    for name, promql in queries.items():
        # A pod's p99 is NaN until a scrape has seen its request counted (rate 0 over [2m]):
        # wait for a number from every pod, not merely a series.
        values = wait_until(lambda q=promql: (v := by_pod(fleet.query(q))) and set(v) == pods
                            and all(math.isfinite(x) for x in v.values()) and v, 20,
                            what=f"{name} for every pod")
        assert all(value >= 0 for value in values.values()), (name, values)
    p99 = by_pod(fleet.query(queries["tts_http_request_p99_seconds"]))
    assert all(0 < value < 30 for value in p99.values()), p99
