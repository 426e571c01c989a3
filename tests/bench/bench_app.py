"""App benchmark (issue 4): cache-hit throughput, miss latency/RTF, behaviour at 10x overload.

Starts the real app (``python -m tts_app --config CFG``, espeak backend, cache in a temp
dir) on a free port and measures it over real HTTP:

(a) cache hit: one text is warmed, then ``wrk`` POSTs it (Lua script) -> req/s and p99
    (targets: >= 1500 req/s, p99 <= 20 ms);
(b) miss: unique texts one at a time -> p50/p99 latency and real-time factor
    (synthesis wall time / audio seconds);
(c) overload: 10x the admission capacity (queue + instances) of unique texts at once ->
    status histogram (only 200/429/503 allowed) and p99 of admitted requests vs the
    unloaded p99 of (b) (target: within 2x).

Run: ``.venv/bin/python tests/bench/bench_app.py [--quick]``. Not a pytest test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE_RATE_FALLBACK = 22050
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, payload: dict, timeout: float = 60) -> tuple[int, bytes, float]:
    """POST JSON; returns (status, body, seconds)."""
    data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, body, time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wav_seconds(body: bytes) -> float:
    """Audio length of a PCM RIFF WAV from its header (fmt byte rate, data size)."""
    if body[:4] != b"RIFF":
        return 0.0
    byte_rate = int.from_bytes(body[28:32], "little")
    index = body.find(b"data", 12)
    size = int.from_bytes(body[index + 4:index + 8], "little") if index > 0 else 0
    return size / byte_rate if byte_rate else 0.0


class App:
    """The app under test as a child process with its own temp config/cache/log."""

    def __init__(self, workdir: Path, queue_size: int, extra: dict | None = None,
                 prefix: list[str] | None = None) -> None:
        """``extra``: config sections merged over the defaults; ``prefix``: a command the
        app runs under (e.g. ``taskset -c 0``)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "app.yaml"
        config: dict = {
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "log": {"path": str(workdir / "app.log")},
            "cache": {"dir": str(workdir / "cache")},
            "gate": {"file": str(workdir / "gate.json")},
            "admission": {"queue_size": queue_size, "rate_limit": {"enabled": False}}}
        for section, values in (extra or {}).items():
            config[section] = {**config.get(section, {}), **values}
        self.config.write_text(json.dumps(config))
        self.process = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "tts_app", "--config", str(self.config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited: {self.process.stderr.read()}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        with urllib.request.urlopen(self.base + "/status", timeout=2) as s:
                            return json.loads(s.read())
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("app not ready in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def bench_cache_hit(app: App, workdir: Path, seconds: int, connections: int) -> dict:
    payload = {"text": "The quick brown fox jumps over the lazy dog.", "voice": "default",
               "lang": "en", "format": "wav"}
    status, _, _ = post(app.base + "/v1/tts", payload)
    if status != 200:
        raise RuntimeError(f"warm-up request failed: HTTP {status}")
    script = workdir / "post.lua"
    script.write_text(WRK_LUA.format(body=json.dumps(json.dumps(payload))))
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"error": "wrk not installed"}
    out = subprocess.run([wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(script), app.base + "/v1/tts"],
                         capture_output=True, text=True, check=True).stdout
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": _wrk_ms(out, "50%"), "p99_ms": _wrk_ms(out, "99%"),
            "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx.*?:\s+(\d+)", out)) else 0,
            "raw": out}


def _wrk_ms(out: str, label: str) -> float:
    match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)\b", out)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _unique_text(tag: str, i: int) -> str:
    return f"Request {tag} number {i}: the weather today is mild with a light breeze."


def bench_miss(app: App, count: int) -> dict:
    latencies, audio = [], []
    for i in range(count):
        status, body, seconds = post(app.base + "/v1/tts",
                                     {"text": _unique_text("miss", i), "format": "wav"})
        if status != 200:
            raise RuntimeError(f"miss request {i}: HTTP {status}")
        latencies.append(seconds)
        audio.append(wav_seconds(body))
    return {"n": count, "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "rtf": sum(latencies) / sum(audio) if sum(audio) else float("nan")}


def bench_overload(app: App, capacity: int, rounds: int, factor: int = 10) -> dict:
    """Fire ``factor`` x capacity unique requests at once, ``rounds`` times.

    Returns the status histogram and the p99 of admitted (200) requests. ``factor=1`` is
    the at-capacity baseline: admitted requests queue behind up to ``capacity - 1`` others
    either way, so overload must not cost them more than that queueing does.
    """
    statuses: Counter[int] = Counter()
    admitted: list[float] = []
    burst = factor * capacity
    with concurrent.futures.ThreadPoolExecutor(max_workers=burst) as pool:
        for r in range(rounds):
            futures = [pool.submit(post, app.base + "/v1/tts",
                                   {"text": _unique_text(f"load{factor}x{r}", i),
                                    "format": "wav"})
                       for i in range(burst)]
            for future in futures:
                status, _, seconds = future.result()
                statuses[status] += 1
                if status == 200:
                    admitted.append(seconds)
    return {"burst": burst, "statuses": dict(sorted(statuses.items())),
            "only_allowed": set(statuses) <= {200, 429, 503},
            "p99_admitted_ms": percentile(admitted, 99) * 1000, "n_admitted": len(admitted)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    seconds, misses, rounds = (3, 10, 1) if args.quick else (10, 50, 3)
    with tempfile.TemporaryDirectory(prefix="bench_app_") as tmp:
        workdir = Path(tmp)
        app = App(workdir, args.queue_size)
        try:
            status = app.wait_ready()
            capacity = int(status.get("capacity") or 1) + args.queue_size
            hit = bench_cache_hit(app, workdir, seconds, args.connections)
            miss = bench_miss(app, misses)
            full = bench_overload(app, capacity, rounds, factor=1)
            load = bench_overload(app, capacity, rounds)
        finally:
            app.stop()
    print(f"backend={status.get('backend')} model={status.get('model_version')} "
          f"capacity={capacity}")
    print(f"{'measure':<34}{'value':>14}  target")
    print(f"{'(a) cache-hit req/s':<34}{hit.get('rps', float('nan')):>14.0f}  >= 1500")
    print(f"{'(a) cache-hit p50 ms':<34}{hit.get('p50_ms', float('nan')):>14.2f}")
    print(f"{'(a) cache-hit p99 ms':<34}{hit.get('p99_ms', float('nan')):>14.2f}  <= 20")
    print(f"{'(a) cache-hit non-2xx':<34}{hit.get('non2xx', 0):>14d}  0")
    print(f"{'(b) miss p50 ms':<34}{miss['p50_ms']:>14.1f}")
    print(f"{'(b) miss p99 ms (unloaded)':<34}{miss['p99_ms']:>14.1f}")
    print(f"{'(b) miss real-time factor':<34}{miss['rtf']:>14.4f}")
    print(f"{'(c) at-capacity burst p99 ms':<34}{full['p99_admitted_ms']:>14.1f}")
    print(f"{'(c) overload burst size':<34}{load['burst']:>14d}")
    print(f"{'(c) overload statuses':<34}{json.dumps(load['statuses']):>14}  200/429/503 only")
    print(f"{'(c) admitted p99 ms':<34}{load['p99_admitted_ms']:>14.1f}  "
          f"<= {2 * miss['p99_ms']:.1f} (2x unloaded); "
          f"{load['p99_admitted_ms'] / full['p99_admitted_ms']:.2f}x at-capacity")
    ok = load["only_allowed"] and full["only_allowed"] and hit.get("non2xx", 1) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
