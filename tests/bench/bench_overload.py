"""Overload benchmark (issue 16): goodput and admitted latency at 1x, 10x and 20x load.

Starts the real app (``python -m tts_app``, espeak backend, ``instances: 1``, rate limit off,
cache on but every text distinct, so every admitted request is a synthesis) pinned to one CPU
with ``taskset``, and drives it with ``wrk`` pinned to another CPU. A Lua script sends a new
text each request; two client behaviours:

- ``ignore``: the next request follows the 429 at once (a retry loop that ignores
  Retry-After: the worst case, each connection is a closed loop as fast as the app answers);
- ``honour``: after a 429 the connection waits Retry-After seconds.

At capacity means ``capacity + queue_size`` connections (every one admitted); 10x and 20x
mean ten and twenty times as many. Each behaviour runs 1x, 10x, 20x, then 1x again; the
ratios ("vs 1x") are against the mean of the two 1x runs. Successes are counted from the app's own
``synthesis_complete`` records (status success, not a cache hit) stamped inside the run, and
the admitted latency is the ``duration_ms`` of its ``http_request`` records with status 200
(queue wait included). The CPU cost of one rejection is the CPU time of the event-loop and
log-writer threads (``/proc/PID/task``) during the 10x ``ignore`` run divided by the
requests answered, almost all of which are 429s.

Run: ``python tests/bench/bench_overload.py [--quick] [--seconds N] [--queue-size N]``.
Figures, not pass/fail; on a shared machine they are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.bench_app import App, percentile

LUA = """
local counter = 0
-- Retry-After waits owed: wrk asks delay() for a connection's next request after other
-- connections' responses may have arrived, so one shared count (not a last value) keeps
-- the number of waits equal to the number of 429s.
local owed = {{}}
local honour = {honour}
local prefix = "{tag}-" .. tostring(math.random(1, 1000000000))

request = function()
   counter = counter + 1
   local body = '{{"text": "Request ' .. prefix .. " number " .. counter ..
      ': the weather today is mild with a light breeze.", "format": "wav"}}'
   return wrk.format("POST", "/v1/tts", {{["Content-Type"] = "application/json"}}, body)
end

response = function(status, headers, body)
   if honour and status == 429 then
      table.insert(owed, (tonumber(headers["Retry-After"]) or 1) * 1000)
   end
end

delay = function()
   return table.remove(owed, 1) or 0
end
"""


@dataclass
class Run:
    label: str
    connections: int
    seconds: float
    answered: int
    goodput: float          # successful syntheses per second
    p99_admitted_ms: float
    rejected: int
    loop_cpu_s: float


def _loop_cpu_s(pid: int) -> float:
    """CPU seconds of the event-loop thread (the main thread, whose id is the pid)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_record_cpu_us(records: int = 50_000) -> float:
    """Process CPU (formatting on the caller, batch writes on the writer thread) per
    ``http_request`` record, measured in this process with the app's StructuredLog."""
    from tts_app.logging import StructuredLog

    with tempfile.TemporaryDirectory(prefix="bench_log_") as tmp:
        log = StructuredLog(Path(tmp) / "app.log")
        started = time.process_time()
        for i in range(records):
            log.event("http_request", f"{i:032x}", method="POST", route="/v1/tts",
                      status=429, duration_ms=0.123)
        log.close()
        return (time.process_time() - started) / records * 1e6


def _records(path: Path, offset: int) -> tuple[list[dict], int]:
    data = path.read_bytes()
    lines = data[offset:].splitlines()
    return [json.loads(line) for line in lines if line.strip()], len(data)


def _stamp(record: dict) -> float:
    return datetime.fromisoformat(record["time"]).timestamp()


def _settle(app: App, log: Path) -> None:
    """Wait until nothing runs or waits and the log writer has written it (<= 100 ms)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with urllib.request.urlopen(app.base + "/status", timeout=5) as response:
            status = json.loads(response.read())
        if status["waiting"] == 0 and status["running"] == 0:
            time.sleep(0.3)
            return
        time.sleep(0.2)
    raise RuntimeError("app did not settle")


def run_load(app: App, workdir: Path, log: Path, label: str, connections: int,
             seconds: int, honour: bool, cpus: tuple[str, str]) -> Run:
    script = workdir / f"{label}.lua"
    script.write_text(LUA.format(honour="true" if honour else "false", tag=label))
    _settle(app, log)
    _, offset = _records(log, 0)
    cpu_before = _loop_cpu_s(app.process.pid)
    started = time.time()
    wrk = subprocess.run(
        ["taskset", "-c", cpus[1], "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
         "--timeout", "30s", "-s", str(script), app.base + "/v1/tts"],
        capture_output=True, text=True, check=True)
    ended = time.time()
    cpu = _loop_cpu_s(app.process.pid) - cpu_before
    _settle(app, log)
    records, _ = _records(log, offset)
    inside = [r for r in records if started <= _stamp(r) <= ended]
    ok = [r for r in inside if r["event"] == "synthesis_complete"
          and r.get("status") == "success" and not r.get("cache_hit")]
    requests = [r for r in inside if r["event"] == "http_request"]
    admitted = [r["duration_ms"] for r in requests if r["status"] == 200]
    if "Socket errors" in wrk.stdout:
        errors = wrk.stdout.split("Socket errors")[1].splitlines()[0]
        print(f"  note ({label}): wrk reports socket errors{errors}")
    return Run(label, connections, ended - started, len(requests), len(ok) / (ended - started),
               percentile(admitted, 99), sum(r["status"] == 429 for r in requests), cpu)


def status_delay(given: float | None) -> str:
    from tts_app.config import AdmissionConfig

    return f"{AdmissionConfig().shed_delay_s if given is None else given:g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (4 s per load)")
    parser.add_argument("--seconds", type=int, default=15, help="duration of each load")
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--cpus", default="0,1", help="APP_CPU,WRK_CPU for taskset")
    parser.add_argument("--shed-delay", type=float, default=None,
                        help="admission.shed_delay_s (default: the app's default); 0 answers "
                             "429s at once, which shows the raw cost of a rejection")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("wrk and taskset are needed", file=sys.stderr)
        return 2
    seconds = 4 if args.quick else args.seconds
    cpus = tuple(args.cpus.split(","))
    assert len(cpus) == 2, "--cpus APP_CPU,WRK_CPU"
    results: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench_overload_") as tmp:
        workdir = Path(tmp)
        shed = {} if args.shed_delay is None else {"shed_delay_s": args.shed_delay}
        app = App(workdir, args.queue_size,
                  extra={"backend": {"espeak": {"instances": 1}}, "log": {"max_bytes": 0},
                         "admission": shed},
                  prefix=["taskset", "-c", cpus[0]])
        try:
            status = app.wait_ready()
            capacity = int(status["capacity"]) + args.queue_size
            for honour in (False, True):
                mode = "honour" if honour else "ignore"
                # 1x before and after the overloads: the reference is their mean, so a
                # drift of the machine's load during the run shows instead of skewing ratios
                for label, factor in (("1x", 1), ("10x", 10), ("20x", 20), ("1x-again", 1)):
                    results.append(run_load(app, workdir, workdir / "app.log",
                                            f"{mode}-{label}", factor * capacity, seconds,
                                            honour, cpus))
        finally:
            app.stop()
    print(f"app: espeak instances=1 queue_size={args.queue_size} (at capacity = {capacity} "
          f"connections), shed_delay_s={status_delay(args.shed_delay)}, pinned to CPU "
          f"{cpus[0]}; wrk -t1 pinned to CPU {cpus[1]}; {seconds} s per load")
    print(f"{'load':<16}{'conns':>6}{'answered/s':>12}{'429':>8}{'goodput/s':>11}"
          f"{'vs 1x':>7}{'p99 200 ms':>12}{'vs 1x':>7}")
    for run in results:
        mode = run.label.split("-")[0]
        refs = [r for r in results if r.label in (f"{mode}-1x", f"{mode}-1x-again")]
        goodput = sum(r.goodput for r in refs) / len(refs)
        p99 = sum(r.p99_admitted_ms for r in refs) / len(refs)
        print(f"{run.label:<16}{run.connections:>6}{run.answered / run.seconds:>12.0f}"
              f"{run.rejected:>8}{run.goodput:>11.1f}{run.goodput / goodput:>7.0%}"
              f"{run.p99_admitted_ms:>12.0f}{run.p99_admitted_ms / p99:>7.2f}")
    ten = next(r for r in results if r.label == "ignore-10x")
    record_us = log_record_cpu_us(5_000 if args.quick else 50_000)
    print(f"CPU of one log record (format + buffered write, in process): {record_us:.1f} us")
    if ten.rejected:
        print(f"event-loop CPU per answered request at ignore-10x "
              f"({ten.rejected / ten.answered:.1%} of them 429, two log records each): "
              f"{ten.loop_cpu_s / ten.answered * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
