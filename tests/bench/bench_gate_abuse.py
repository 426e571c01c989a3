"""Does the gate always answer? ``GET /ingress`` latency on the real sidecar process, idle and
under abuse, side by side in one run.

    python tests/bench/bench_gate_abuse.py           # 1,000,000 log lines to catch up
    python tests/bench/bench_gate_abuse.py --quick   # 300,000 lines, fewer idle probes

Idle: sequential ``GET /ingress`` probes (a fresh connection each, as a kubelet probe or an
nginx ``auth_request`` makes them), 10 ms apart, nothing else running.

Abuse, all at the same time, probing the same way until the sidecar has counted every line:
- the sidecar catches up a log file moved into its log directory: realistic mixed lines
  (tests/bench/make_logs.py) plus ``http_request`` lines with every combination of N methods,
  N routes and N statuses (the largest ``/metrics`` the label bounds let through) and lines
  with 60 KB voice names;
- 4 clients scrape ``/metrics`` back to back;
- 16 clients hammer ``/requests`` with hostile parameters (a billion as limit, 5,000-digit
  limits, junk statuses, 8 KB ids, invalid values).
The clients run in their own processes, so their work does not steal the probe's interpreter.
Goal: abuse p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.bench.make_logs import write_log  # noqa: E402
from tests.support.local_stack import Process, free_port, http_get, write_gpu_file  # noqa: E402

HOSTILE_REQUESTS = [
    "/requests?limit=1000000000",
    "/requests?limit=" + "9" * 5000,
    "/requests?status=failed&limit=1000000000",
    "/requests?status=" + "x" * 4000 + "&limit=1000",
    "/requests?limit=-1",
    "/requests?limit=abc",
    "/requests/" + "r" * 8000,
    "/requests/unknown-request-id",
]


def write_abusive_log(path: Path, lines: int, fanout: int, long_lines: int) -> int:
    """Mixed realistic lines, then the cardinality and long-line abuse; the line count.

    Label values are as long as ``metrics.label_value_max_bytes`` keeps (longer ones are cut),
    and every log-labelled family gets more distinct values than its budget: the page the
    scrapers fetch is the largest the bounds let through."""
    combos = fanout ** 3
    spread = fanout ** 2
    write_log(path, lines - combos - 3 * spread - long_lines)
    pad = "x" * 120

    def label(kind: str, i: int) -> str:
        return f"{kind}{i}{pad}"

    methods = [label("M", i) for i in range(fanout)]
    routes = [label("/route/", i) for i in range(fanout)]
    statuses = [str(200 + i) for i in range(fanout)]
    with path.open("a", encoding="utf-8") as out:
        for n, (method, route, status) in enumerate(itertools.product(methods, routes,
                                                                       statuses)):
            out.write(json.dumps({"time": 1.0 + n, "level": "INFO", "event": "http_request",
                                  "request_id": f"c{n}", "method": method, "route": route,
                                  "status": int(status), "duration_ms": 3}) + "\n")
        for n in range(spread):
            out.write(json.dumps({"time": 3.0 + n, "level": "ERROR",
                                  "event": "synthesis_complete", "request_id": f"s{n}",
                                  "status": label("S", n % fanout),
                                  "error_code": label("E", n // fanout),
                                  "model_version": label("V", n), "duration_ms": 5}) + "\n")
            out.write(json.dumps({"time": 3.0 + n, "level": "INFO", "event": "stage_time",
                                  "request_id": f"s{n}", "stage": label("stage", n),
                                  "duration_ms": 1}) + "\n")
            out.write(json.dumps({"time": 3.0 + n, "level": "WARNING", "event": "odd",
                                  "warning_code": label("W", n)}) + "\n")
        for n in range(long_lines):
            out.write(json.dumps({"time": 2.0 + n, "level": "INFO",
                                  "event": "synthesis_start", "request_id": f"v{n}",
                                  "voice": "v" * 60_000, "text_len": 10}) + "\n")
    return lines


def hammer(port: int, paths: list[str], clients: int, stop: Any, counts: Any) -> None:
    """``clients`` threads requesting ``paths`` in turn on keep-alive connections until
    ``stop`` is set; adds the answers it got to ``counts``."""
    done = [0] * clients

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for path in itertools.cycle(paths[i % len(paths):] + paths[:i % len(paths)]):
            if stop.is_set():
                break
            try:
                connection.request("GET", path)
                connection.getresponse().read()
                done[i] += 1
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with counts.get_lock():
        counts.value += sum(done)


def probe(port: int) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/ingress")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"/ingress answered {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started


def lines_counted(port: int) -> float:
    _, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=60)
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("tts_exporter_log_lines_total{"))


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return (f"n={len(ordered):>5}  p50 {statistics.median(ordered) * 1000:7.1f} ms  "
            f"p99 {p99 * 1000:7.1f} ms  max {ordered[-1] * 1000:7.1f} ms")


def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-gate-abuse-"))
    port = free_port()
    (workdir / "logs").mkdir()
    write_gpu_file(workdir / "gpu.json", 0.40)
    config = {"server": {"listen": f"127.0.0.1:{port}"},
              "logs": {"paths": [str(workdir / "logs" / "*.log")],
                       "checkpoint_path": str(workdir / "state" / "offsets.json")},
              "gpu": {"source": f"file:{workdir / 'gpu.json'}"},
              "gate": {"gate_file": str(workdir / "state" / "ingress.json")}}
    (workdir / "exporter.yaml").write_text(yaml.safe_dump(config))
    print(f"writing {args.lines:,} lines ({args.fanout}^3 HTTP label combinations, "
          f"{args.long_lines} lines with 60 KB voices) ...", flush=True)
    staged = workdir / "staged.log"
    total = write_abusive_log(staged, args.lines, args.fanout, args.long_lines)
    sidecar = Process("exporter", [sys.executable, "-m", "exporter", "--config",
                                   str(workdir / "exporter.yaml")],
                      f"http://127.0.0.1:{port}/healthz", workdir / "exporter.out", REPO)
    context = multiprocessing.get_context("spawn")
    stop, counts = context.Event(), context.Value("q", 0)
    try:
        sidecar.start()
        sidecar.wait_ready(timeout=30)
        idle = []
        for _ in range(args.idle_probes):
            idle.append(probe(port))
            time.sleep(0.01)

        workers = [context.Process(target=hammer, args=(port, ["/metrics"], 4, stop, counts)),
                   context.Process(target=hammer, args=(port, HOSTILE_REQUESTS, 16, stop,
                                                        counts))]
        for worker in workers:
            worker.start()
        time.sleep(1.0)   # the clients are connected and busy
        started = time.monotonic()
        os.replace(staged, workdir / "logs" / "app.log")
        abused, next_check, counted = [], started + 2.0, 0.0
        while counted < total:
            abused.append(probe(port))
            time.sleep(0.01)
            if time.monotonic() >= next_check:
                counted = lines_counted(port)
                next_check = time.monotonic() + 2.0
        catch_up_s = time.monotonic() - started
        metrics_bytes = len(http_get(f"http://127.0.0.1:{port}/metrics", timeout=60)[1])
        stop.set()
        for worker in workers:
            worker.join(120)
    finally:
        stop.set()
        sidecar.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} (1/5/15 min) at the end")
    print(f"catch-up: {total:,} lines in {catch_up_s:.1f} s ({total / catch_up_s:,.0f} lines/s "
          f"under abuse); final /metrics {metrics_bytes / 1e6:.2f} MB; "
          f"{counts.value:,} abusive requests answered")
    print(f"GET /ingress idle : {summary(idle)}")
    print(f"GET /ingress abuse: {summary(abused)}   (goal p99 <= 20 ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="300,000 lines (20^3 label combinations), 300 idle probes")
    args = parser.parse_args(argv)
    if args.quick:
        args.lines, args.fanout, args.long_lines, args.idle_probes = 300_000, 20, 100, 300
    else:
        args.lines, args.fanout, args.long_lines, args.idle_probes = 1_000_000, 50, 500, 2000
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
