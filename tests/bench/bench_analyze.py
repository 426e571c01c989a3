"""Benchmark ``tts-exporter analyze`` against ``zcat -f FILES | grep -c synthesis_complete``.

Generates realistic rotated logs once (tests/bench/make_logs.py: both formats, tracebacks,
broken lines) as app.log.2.gz + app.log.1 + app.log, then times both commands on the same
files and reports wall time, the ratio, and analyze's peak RSS.

    python tests/bench/bench_analyze.py            # ~1 GB
    python tests/bench/bench_analyze.py --quick    # ~100 MB
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.make_logs import generate

BYTES_PER_LINE = 177          # make_logs average, to size the generated set


def make_set(directory: Path, total_bytes: int) -> list[Path]:
    """Three rotated parts (first one gzipped), reused when already generated."""
    directory.mkdir(parents=True, exist_ok=True)
    names = ["app.log.2.gz", "app.log.1", "app.log"]
    paths = [directory / n for n in names]
    marker = directory / f".complete-{total_bytes}"
    if marker.exists():
        return paths
    lines = generate(total_bytes // BYTES_PER_LINE)
    part = total_bytes // 3
    for path in paths:
        written = 0
        with (gzip.open(path, "wt", compresslevel=1) if path.suffix == ".gz"
              else open(path, "w")) as fh:
            for line in lines:
                fh.write(line + "\n")
                written += len(line) + 1
                if written >= part and path != paths[-1]:
                    break
    marker.touch()
    return paths


def timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, str]:
    start = time.perf_counter()
    env = {**os.environ, "TZ": "UTC"}      # the text lines' local stamps read as UTC
    out = subprocess.run(cmd, shell=shell, capture_output=True, text=True, check=True,
                         env=env).stdout
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="~100 MB instead of ~1 GB")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tts-bench-analyze"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--full-parse", action="store_true",
                        help="also time --no-fast (the exact per-line path), for comparison")
    args = parser.parse_args()
    size = 100_000_000 if args.quick else 1_000_000_000
    t0 = time.perf_counter()
    paths = make_set(args.dir / str(size), size)
    print(f"logs: {', '.join(f'{p.name}={p.stat().st_size / 1e6:.0f}MB' for p in paths)} "
          f"(ready in {time.perf_counter() - t0:.1f}s)")
    files = " ".join(str(p) for p in paths)
    _, raw = timed(f"zcat -f {files} | wc -c", shell=True)
    print(f"uncompressed input: {int(raw) / 1e6:.0f} MB")
    base, count = timed(f"zcat -f {files} | grep -c synthesis_complete", shell=True)
    print(f"zcat -f | grep -c synthesis_complete: {base:.2f}s ({count.strip()} lines)")
    def analyze(*options: str, jobs: int = args.jobs) -> list[str]:
        return [sys.executable, "-m", "exporter", "analyze", "--json", "--jobs", str(jobs),
                *options, *map(str, paths)]

    wall, _ = timed(analyze())
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"analyze --jobs {args.jobs}: {wall:.2f}s = {wall / base:.2f}x the baseline, "
          f"{int(raw) / 1e6 / wall:.0f} MB/s, peak RSS {rss_kb / 1024:.0f} MiB "
          f"(largest process)")
    wall, _ = timed(analyze(jobs=1))
    print(f"analyze --jobs 1 (one core): {wall:.2f}s = {wall / base:.2f}x the baseline, "
          f"{int(raw) / 1e6 / wall:.0f} MB/s")
    window = ["--since", "2026-11-22T10:05:00+00:00", "--until", "2026-11-22T10:07:00+00:00"]
    wall, _ = timed(analyze(*window))
    print(f"analyze --jobs {args.jobs} over a 2-minute window: {wall:.2f}s = "
          f"{wall / base:.2f}x the baseline")
    wall, _ = timed(analyze("--id", "ts_00086381"))
    print(f"analyze --id (one request's timeline): {wall:.2f}s = {wall / base:.2f}x the "
          "baseline")
    if args.full_parse:
        wall, _ = timed(analyze("--no-fast"))
        print(f"analyze --jobs {args.jobs} --no-fast (every line through the parser): "
              f"{wall:.2f}s = {wall / base:.2f}x the baseline")


if __name__ == "__main__":
    main()
