"""The idle sidecar's memory and import time: what a validation library costs it.

    python tests/bench/bench_footprint.py                 # 5 starts, 10 import timings
    python tests/bench/bench_footprint.py --quick         # 1 start, 3 import timings
    python tests/bench/bench_footprint.py --source DIR    # measure another checkout's exporter/

Starts ``python -m exporter --config config/exporter.yaml`` (the shipped file, on a free port,
in a scratch directory so no state is shared), reads VmRSS and VmHWM from /proc after
``--settle`` seconds, and times ``import exporter.sidecar`` in a fresh interpreter. Figures
are medians. ``--source`` puts another checkout first on the path (e.g. main, to compare).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def idle_memory(source: Path, settle_s: float) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "exporter.yaml"
        shutil.copy(REPO / "config" / "exporter.yaml", config)
        config.write_text(config.read_text().replace("127.0.0.1:9109",
                                                     f"127.0.0.1:{free_port()}"))
        env = {**os.environ, "PYTHONPATH": str(source)}
        process = subprocess.Popen([sys.executable, "-m", "exporter", "--config", str(config)],
                                   cwd=scratch, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            time.sleep(settle_s)
            if process.poll() is not None:
                raise SystemExit(f"the sidecar exited with {process.returncode}")
            return status_kib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)


def import_seconds(source: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(source)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import exporter.sidecar"], env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--source", type=Path, default=REPO)
    parser.add_argument("--settle", type=float, default=5.0)
    args = parser.parse_args()
    starts, imports = (1, 3) if args.quick else (5, 10)
    memory = [idle_memory(args.source, args.settle) for _ in range(starts)]
    seconds = [import_seconds(args.source) for _ in range(imports)]
    rss, hwm = (statistics.median(m[key] for m in memory) / 1024 for key in ("VmRSS", "VmHWM"))
    print(f"source {args.source}: idle VmRSS {rss:.1f} MiB, VmHWM {hwm:.1f} MiB "
          f"(median of {starts} starts); import exporter.sidecar "
          f"{statistics.median(seconds) * 1000:.0f} ms (median of {imports}, interpreter "
          "start included)")


if __name__ == "__main__":
    main()
