"""Log throughput, side by side per file: bare Python loop, mtail, the pipeline, the sidecar.

    python tests/bench/bench_logs.py            # 1,000,000 mixed and 400,000 text lines
    python tests/bench/bench_logs.py --quick    # 100,000 of each

Two files, each measured by every reader in the same run: the contract's mixed events
(tests/bench/make_logs.py: both formats, every event; issue 2's figures) and IndexTTS
text-format ``synthesis_complete`` lines only (issue 21's figures), where mtail runs
tests/bench/equivalent_text.mtail (one regex in the fixed field order, as an mtail user writes
it for a fixed-format log). On each file it measures:
- a bare Python read+regex loop (read lines, one regex extracting the event and its duration,
  a dict increment): the floor cost of looking at every line in Python;
- Debian's mtail in ``--one_shot`` mode, with tests/bench/equivalent.mtail (the same families,
  labels, unit conversions and outcomes as the pipeline: the fair comparison) and with a
  minimal program (event names, durations, error codes only: mtail's cheapest case);
- the sidecar's pipeline in-process (1 MiB reads → LogPipeline.process);
- the real sidecar end to end in live tail mode: ``python -m exporter`` follows an empty log,
  the whole file is appended at once, and the clock stops when ``/metrics`` has counted every
  line; then its peak RSS, and its CPU while lines of the same kind arrive at a steady 3,000
  lines/s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.make_logs import (  # noqa: E402
    generate,
    synthesis_text_lines,
    write_lines,
    write_log,
)
from tests.support.local_stack import free_port, http_get, wait_until  # noqa: E402

# Counts what LogPipeline counts (same families, labels, unit conversions, outcomes), as
# an mtail user would write it for both formats: the fair comparison.
MTAIL_PROGRAM = (Path(__file__).parent / "equivalent.mtail").read_text()
# The same for the text-only file: what the sidecar makes of its lines, one fixed-order regex.
MTAIL_TEXT_PROGRAM = (Path(__file__).parent / "equivalent_text.mtail").read_text()

# Only event names, durations and error codes: a lower bound on mtail's per-line cost,
# reported so the ratio is also visible against the cheapest program mtail could run.
MTAIL_MINIMAL = r"""
counter tts_lines_total by event
counter tts_error_records_total by code
histogram tts_duration_ms by event buckets 25, 50, 100, 250, 500, 800, 1000, 2500, 5000

/"event": "(?P<event>\w+)"/ {
  tts_lines_total[$event]++
  /"duration_ms": (?P<d>\d+(\.\d+)?)/ {
    tts_duration_ms[$event] = $d
  }
  /"error_code": "(?P<code>[A-Z_]+)"/ {
    tts_error_records_total[$code]++
  }
}
/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - \S+ - \w+ - (?P<event>[a-z_]+): / {
  tts_lines_total[$event]++
  /duration_ms=(?P<d>\d+(\.\d+)?)/ {
    tts_duration_ms[$event] = $d
  }
  /error_code=(?P<code>[A-Z_]+)/ {
    tts_error_records_total[$code]++
  }
}
"""

BARE_REGEX = re.compile(
    rb'"event": "(\w+)".*?"duration_ms": ([\d.]+)'
    rb"|^\S+ \S+ - \S+ - \w+ - (\w+): .*?duration_ms=([\d.]+)")


def bare_loop(path: Path) -> float:
    """Lines/s of the minimal Python loop: read each line, one regex, one dict update."""
    counts: dict[bytes, float] = {}
    start = time.perf_counter()
    lines = 0
    with path.open("rb") as f:
        for line in f:
            lines += 1
            match = BARE_REGEX.search(line)
            if match:
                event = match.group(1) or match.group(3)
                counts[event] = counts.get(event, 0.0) + float(match.group(2) or match.group(4))
    return lines / (time.perf_counter() - start)


def in_process(path: Path) -> float:
    from exporter.config import Config
    from exporter.logs.pipeline import LogPipeline
    from exporter.metrics import SidecarMetrics

    config = Config()
    metrics = SidecarMetrics()
    pipeline = LogPipeline(metrics, config.logs, config.metrics)
    start = time.perf_counter()
    with path.open("rb") as f:
        rest = b""
        while chunk := f.read(1 << 20):
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            rest = chunk[cut:]
            with metrics.updating():
                pipeline.process(str(path), chunk[:cut])
    lines = sum(metrics.log_lines.values.values())
    return lines / (time.perf_counter() - start)


def mtail(path: Path, work: Path, program: str, name: str) -> float | None:
    binary = shutil.which("mtail")
    if binary is None:
        print("mtail not installed (apt-get install mtail): skipped", file=sys.stderr)
        return None
    progs = work / f"progs-{name}"
    progs.mkdir()
    (progs / "tts.mtail").write_text(program)
    lines = sum(1 for _ in path.open("rb"))
    start = time.perf_counter()
    result = subprocess.run([binary, "--one_shot", "--one_shot_format", "prometheus",
                             "--progs", str(progs), "--logs", str(path), "--logtostderr"],
                            capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or "_total{" not in result.stdout:
        print("mtail failed:", result.stderr[-2000:], file=sys.stderr)
        return None
    return lines / elapsed


def metrics_total(url: str, name: str) -> float:
    _, body = http_get(url)
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used, peak RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return cpu, hwm


def live_sidecar(path: Path, work: Path, steady: list[str]) -> dict[str, float]:
    """The real sidecar following a log: catch-up lines/s, peak RSS, CPU while ``steady``
    arrives at 3,000 lines/s."""
    work = work / f"live-{path.stem}"
    log = work / "live" / "app.log"
    log.parent.mkdir(parents=True)
    log.touch()
    port = free_port()
    config = work / "exporter.yaml"
    config.write_text(
        f"server: {{listen: '127.0.0.1:{port}'}}\n"
        f"logs: {{paths: ['{log}'], checkpoint_path: '{work / 'offsets.json'}'}}\n"
        "gpu: {source: none}\ngate: {enabled: false}\n")
    url = f"http://127.0.0.1:{port}/metrics"
    process = subprocess.Popen([sys.executable, "-m", "exporter", "--config", str(config)],
                               cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_get(url)[0] == 200, timeout=30, what="the sidecar to start")
        lines = sum(1 for _ in path.open("rb"))
        start = time.perf_counter()
        with log.open("ab") as out, path.open("rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
        wait_until(lambda: metrics_total(url, "tts_exporter_log_lines_total") >= lines,
                   timeout=600, interval=0.05, what="the sidecar to count every line")
        catch_up = lines / (time.perf_counter() - start)
        _, rss_after_catch_up = proc_stat(process.pid)

        # Steady 3,000 lines/s, written in 100 ms slices as a busy service would.
        cpu_before, _ = proc_stat(process.pid)
        begin = time.perf_counter()
        with log.open("a", encoding="utf-8") as out:
            for i in range(0, len(steady), 300):
                out.write("\n".join(steady[i:i + 300]) + "\n")
                out.flush()
                time.sleep(max(0.0, begin + (i + 300) / 3000 - time.perf_counter()))
        wall = time.perf_counter() - begin
        wait_until(lambda: metrics_total(url, "tts_exporter_log_lines_total")
                   >= lines + len(steady), timeout=30, what="the steady lines to be counted")
        cpu_after, rss = proc_stat(process.pid)
        return {"catch_up": catch_up, "rss_mb": max(rss, rss_after_catch_up) / 2**20,
                "steady_cpu_percent": 100 * (cpu_after - cpu_before) / wall}
    finally:
        process.terminate()
        process.wait(timeout=15)


def measure(path: Path, work: Path, program: str, steady: list[str]) -> None:
    """Every reader on one file, then the rows with their ratios to the mtail rows."""
    size_mb = path.stat().st_size / 2**20
    lines = sum(1 for _ in path.open("rb"))
    print(f"{path.name}: {lines:,} lines ({size_mb:.0f} MiB)")
    bare = bare_loop(path)
    mtail_rate = mtail(path, work, program, f"equivalent-{path.stem}")
    mtail_minimal = mtail(path, work, MTAIL_MINIMAL, f"minimal-{path.stem}")
    pipeline = in_process(path)
    live = live_sidecar(path, work, steady)

    def row(name: str, rate: float | None) -> None:
        if rate is None:
            print(f"  {name:<40} {'n/a':>10}")
            return
        vs_mtail = f"{rate / mtail_rate:5.2f}x mtail" if mtail_rate else ""
        vs_min = f"{rate / mtail_minimal:5.2f}x minimal" if mtail_minimal else ""
        print(f"  {name:<40} {rate:>10,.0f} lines/s  {rate / bare:5.0%} of bare  {vs_mtail}"
              f"  {vs_min}")

    row("bare Python read + regex loop", bare)
    row("mtail --one_shot, equivalent program", mtail_rate)
    row("mtail --one_shot, minimal program", mtail_minimal)
    row("sidecar pipeline, in-process", pipeline)
    row("sidecar end to end, live tail (python -m)", live["catch_up"])
    print(f"  sidecar peak RSS: {live['rss_mb']:.1f} MiB")
    cpu = live["steady_cpu_percent"]
    print(f"  sidecar CPU at a steady 3,000 lines/s: {cpu:.1f} % of one core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100k lines of each file, short steady phase")
    parser.add_argument("--lines", type=int, help="mixed lines")
    parser.add_argument("--text-lines", type=int, help="text-format lines")
    args = parser.parse_args()
    count = args.lines or (100_000 if args.quick else 1_000_000)
    text_count = args.text_lines or (100_000 if args.quick else 400_000)
    steady_lines = 3000 * (5 if args.quick else 20)
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        work = Path(tmp)
        print("mixed: both formats, every event")
        measure(write_log(work / "mixed.log", count), work, MTAIL_PROGRAM,
                list(generate(steady_lines, seed=11)))
        print("text: IndexTTS synthesis_complete lines only")
        measure(write_lines(work / "text.log", synthesis_text_lines(text_count)), work,
                MTAIL_TEXT_PROGRAM, list(synthesis_text_lines(steady_lines, seed=11)))


if __name__ == "__main__":
    main()
