"""The one-shot GPU check (``make gpu-check``): the sidecar's NVML path, the VRAM gate and the
chattts backend on a real NVIDIA GPU, in one run of under 5 minutes without network.

    python -m tests.gpu.check [--out gpu-check.json] [--quick]

1. NVML against ``nvidia-smi``: memory, utilisation, temperature, power and per-process
   memory of every GPU, within the tolerances of :class:`tests.gpu.compare.Tolerance`.
2. Health signals: which of XID events, ECC, remapped rows, clock-event reasons and SM clock
   the GPU supports, as the sidecar's ``/metrics`` shows them.
3. The gate: the sidecar on ``gpu.source: nvml`` following GPU 0 by UUID; torch allocates
   until used/total crosses 90 %; the time until ``/ingress`` answers 503 *and* the gate file
   says closed, over 10 crossings (p50, p99); then the memory is freed and the reopen must
   come after the hold time, not before.
4. chattts on CUDA with the tiny model the tests build: real-time factor and VRAM per
   instance for 1 and 2 instances.
5. Batched inference on CUDA: ``tests/bench/bench_batch.py --device cuda`` (8 clients,
   ``batch.max_size`` 1 against 8, one instance): throughput and p50/p99 of each arm.

Prints one report, writes it as JSON, and exits 1 when a reading disagrees with nvidia-smi
beyond tolerance or the gate's p99 exceeds 0.5 s (2 when the set-up is wrong, e.g. a CPU build
of torch). Without a GPU it prints why, writes ``{"skipped": reason}`` and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from exporter.system.gpu import GpuReading, NvmlSource, canonical_uuid
from tests.gpu.compare import (
    SMI_APP_FIELDS,
    SMI_GPU_FIELDS,
    Tolerance,
    compare,
    parse_smi_csv,
    percentile,
)
from tests.support.local_stack import free_port

REPO = Path(__file__).resolve().parents[2]
GATE_P99_LIMIT_S = 0.5
CLOSE_TARGET = 0.92      # allocate up to this used/total: past close_at 0.90 with margin
HOLD_S = 1.0             # gate.reopen_after_s during the check
HEALTH_SERIES = ("tts_gpu_xid_errors_total", "tts_gpu_ecc_uncorrected_errors_total",
                 "tts_gpu_remapped_rows", "tts_gpu_row_remap_pending",
                 "tts_gpu_clock_event_active", "tts_gpu_sm_clock_hertz")


class SetupError(Exception):
    """A GPU is there but the check cannot run (wrong venv, GPU already full)."""


def no_gpu_reason() -> str | None:
    """Why this machine has no NVIDIA GPU to check, or None when it has one."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on PATH: no NVIDIA driver on this machine"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        return f"NVML does not start: {type(exc).__name__}: {exc}"
    return None if count else "NVML reports 0 GPUs"


def cuda_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise SetupError("torch is not installed in this venv (see the README: GPU check)") \
            from None
    if not torch.cuda.is_available():
        raise SetupError(f"torch {torch.__version__} cannot use the GPU (torch.version.cuda="
                         f"{torch.version.cuda}); install a CUDA build (README: GPU check)")
    return torch


# --- 1. NVML against nvidia-smi -----------------------------------------------------------


def nvidia_smi(query: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    out = subprocess.run(["nvidia-smi", f"--query-{query}={','.join(fields)}",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return parse_smi_csv(out, fields)


def nvml_section(source: NvmlSource, attempts: int = 3) -> dict[str, Any]:
    """Readings move between two samples: a field counts as agreeing when one of
    ``attempts`` back-to-back pairs agrees."""
    tolerance = Tolerance()
    disagreements: list[Any] = []
    for _ in range(attempts):
        readings = source.read()
        gpus = nvidia_smi("gpu", SMI_GPU_FIELDS)
        apps = nvidia_smi("compute-apps", SMI_APP_FIELDS)
        disagreements = compare(readings, gpus, apps, tolerance)
        if not disagreements:
            break
    return {"gpus": [_describe(r) for r in readings], "nvidia_smi": gpus,
            "tolerance": dataclasses.asdict(tolerance),
            "disagreements": [d.as_dict() for d in disagreements]}


def _describe(r: GpuReading) -> dict[str, Any]:
    return {"gpu": r.label, "uuid": r.uuid, "name": r.name,
            "memory_used_bytes": r.memory_used_bytes, "memory_total_bytes": r.memory_total_bytes,
            "utilization_ratio": r.utilization_ratio, "temperature_celsius": r.temperature_celsius,
            "power_watts": r.power_watts, "sm_clock_hertz": r.sm_clock_hertz,
            "processes": len(r.processes), "unsupported": sorted(r.unsupported)}


# --- 2. + 3. The sidecar on NVML: health series and the gate ------------------------------


@contextlib.contextmanager
def sidecar(workdir: Path, uuid: str) -> Iterator[str]:
    """The real sidecar (``python -m exporter``) on NVML, following GPU ``uuid``; yields its
    base URL."""
    port = free_port()
    config = {"server": {"listen": f"127.0.0.1:{port}"}, "logs": {"paths": []},
              "gpu": {"source": "nvml", "poll_interval_s": 0.25, "devices": [uuid]},
              "gate": {"gate_file": str(workdir / "ingress.json"), "reopen_after_s": HOLD_S,
                       "on_gpu_failure": "hold"}}
    path = workdir / "exporter.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / "exporter.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "exporter", "--config", str(path)],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(base + "/healthz")[0] == 200, 30, "the sidecar to answer")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
             step_s: float = 0.005) -> float:
    """Seconds until ``condition`` held; SetupError after ``timeout_s``."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout_s:
            raise SetupError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(step_s)
    return time.perf_counter() - started


def health_section(base: str) -> dict[str, Any]:
    _, body = get(base + "/metrics")
    text = body.decode()
    present = {name: any(line.startswith(name) for line in text.splitlines())
               for name in HEALTH_SERIES}
    return {"series_present": present,
            "note": "tts_gpu_xid_errors_total appears with the first XID event only"}


def gate_section(torch: Any, base: str, gate_file: Path, total: int,
                 used: Callable[[], int], crossings: int) -> dict[str, Any]:
    def closed() -> bool:
        try:
            file_closed = json.loads(gate_file.read_text())["open"] is False
        except (OSError, ValueError):
            return False
        return file_closed and get(base + "/ingress")[0] == 503

    def opened() -> bool:
        return get(base + "/ingress")[0] == 200

    if used() / total >= 0.85:
        raise SetupError(f"GPU 0 is already {used() / total:.0%} full; the check needs it "
                         "below the reopen threshold (85 %)")
    wait_for(opened, 10, "the gate to be open before the first crossing")
    close_s, reopen_s = [], []
    for _ in range(crossings):
        block = torch.empty(int(CLOSE_TARGET * total) - used(), dtype=torch.uint8,
                            device="cuda:0")
        torch.cuda.synchronize()
        try:
            close_s.append(wait_for(closed, 5, "/ingress 503 and the gate file closed"))
        except SetupError:  # a gate that does not close is a failed crossing, not set-up
            close_s.append(math.inf)
        del block
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        reopen_s.append(wait_for(opened, HOLD_S + 5, "the gate to reopen"))
    early = [s for s in reopen_s if s < HOLD_S]
    return {"crossings": crossings, "close_latency_s": close_s,
            "close_p50_s": percentile(close_s, 0.5), "close_p99_s": percentile(close_s, 0.99),
            "reopen_s": reopen_s, "hold_s": HOLD_S, "reopened_before_hold": len(early)}


# --- 4. chattts on CUDA ---------------------------------------------------------------------


def chattts_section(torch: Any, used: Callable[[], int], instances: list[int]) \
        -> list[dict[str, Any]]:
    from tests.app.chattts_tiny import build_tiny_assets, configure
    from tts_app.backends.base import SynthesisParams, SynthesisRequest
    from tts_app.backends.chattts import SAMPLE_RATE, ChatTTSBackend

    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-chattts-") as tmp:
        model_dir = build_tiny_assets(Path(tmp))
        for n in instances:
            torch.cuda.empty_cache()
            before = used()
            backend = ChatTTSBackend(model_dir=str(model_dir), device="cuda", instances=n,
                                     max_new_token=96,
                                     config_hook=functools.partial(configure,
                                                                   directory=model_dir))
            backend.load()
            loaded = used()
            rtfs: list[float] = []

            def one(i: int, backend: Any = backend, rtfs: list[float] = rtfs) -> None:
                request = SynthesisRequest(f"check-{i}", "hello from the gpu check.",
                                           "default", "en", SynthesisParams(seed=i))
                started = time.perf_counter()
                samples = sum(len(c) for c in backend.synthesize(request, lambda *_: None))
                rtfs.append((time.perf_counter() - started) / max(samples / SAMPLE_RATE, 1e-9))

            one(-1)  # warm-up: CUDA kernels load on first use
            rtfs.clear()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(2 * n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            report = backend.gpu_devices() or []
            results.append({"instances": n, "vram_per_instance_bytes": (loaded - before) / n,
                            "rtf_mean": sum(rtfs) / len(rtfs) if rtfs else None,
                            "requests": len(rtfs),
                            "status_gpu_devices": [vars(d) for d in report]})
            backend.close()
            del backend
            torch.cuda.empty_cache()
    return results


# --- The run ----------------------------------------------------------------------------------


def run(crossings: int, instances: list[int], quick: bool = False
        ) -> tuple[dict[str, Any], list[str]]:
    """The report and the list of failures (empty: passed)."""
    torch = cuda_torch()
    source = NvmlSource.from_import()
    report: dict[str, Any] = {"nvml_vs_nvidia_smi": nvml_section(source)}
    failures = [f"{d['gpu']} {d['field']}: sidecar {d['sidecar']} vs nvidia-smi "
                f"{d['nvidia_smi']} (allowed {d['allowed']})"
                for d in report["nvml_vs_nvidia_smi"]["disagreements"]]
    uuid = "GPU-" + str(torch.cuda.get_device_properties(0).uuid)
    target = next(r for r in source.read() if canonical_uuid(r.uuid) == canonical_uuid(uuid))

    def used() -> int:
        return next(r.memory_used_bytes for r in source.read() if r.uuid == target.uuid)

    torch.cuda.init()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, \
            sidecar(Path(tmp), uuid) as base:
        report["health_signals"] = health_section(base)
        gate = gate_section(torch, base, Path(tmp) / "ingress.json",
                            target.memory_total_bytes, used, crossings)
        report["gate"] = gate
    if gate["close_p99_s"] > GATE_P99_LIMIT_S:
        failures.append(f"gate close p99 {gate['close_p99_s']:.3f}s > {GATE_P99_LIMIT_S}s")
    if gate["reopened_before_hold"]:
        failures.append(f"the gate reopened before the {HOLD_S}s hold "
                        f"{gate['reopened_before_hold']} time(s)")
    report["chattts"] = chattts_section(torch, used, instances)
    source.close()
    report["batching"] = batching_section(quick)
    return report, failures


def batching_section(quick: bool, device: str = "cuda") -> dict[str, Any]:
    """tests/bench/bench_batch.py on ``device``, in its own process (it loads its own model)."""
    command = [sys.executable, str(REPO / "tests" / "bench" / "bench_batch.py"),
               "--device", device, *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False,
                          cwd=REPO)
    # the report is the last JSON object it prints, one "{" line opening it
    start = ("\n" + done.stdout).rfind("\n{\n")
    if done.returncode != 0 or start < 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-500:]}"}
    return json.loads(done.stdout[start:])


def print_report(report: dict[str, Any], failures: list[str]) -> None:
    if "skipped" in report:
        print(f"gpu-check: SKIPPED: {report['skipped']}")
        return
    nvml = report["nvml_vs_nvidia_smi"]
    for gpu in nvml["gpus"]:
        print(f"GPU {gpu['gpu']} {gpu['name']} {gpu['uuid']}: "
              f"{gpu['memory_used_bytes'] / 2**30:.2f}/{gpu['memory_total_bytes'] / 2**30:.2f} "
              f"GiB; unsupported: {', '.join(gpu['unsupported']) or 'none'}")
    print(f"NVML vs nvidia-smi: {len(nvml['disagreements'])} disagreement(s)")
    print("health series exported: " + ", ".join(
        name for name, present in report["health_signals"]["series_present"].items()
        if present))
    gate = report["gate"]
    print(f"gate: {gate['crossings']} crossings, close p50 {gate['close_p50_s'] * 1000:.0f} ms, "
          f"p99 {gate['close_p99_s'] * 1000:.0f} ms (limit {GATE_P99_LIMIT_S * 1000:.0f} ms); "
          f"reopen after {min(gate['reopen_s']):.2f}-{max(gate['reopen_s']):.2f}s "
          f"(hold {gate['hold_s']}s)")
    for row in report["chattts"]:
        print(f"chattts x{row['instances']}: VRAM/instance "
              f"{row['vram_per_instance_bytes'] / 2**20:.0f} MiB, RTF {row['rtf_mean']:.3f} "
              f"over {row['requests']} requests")
    batching = report["batching"]
    if "error" in batching:
        print(f"batching on CUDA: {batching['error']}")
    else:
        print(f"batching on CUDA: {batching['throughput_ratio']}x throughput, p99 "
              f"{batching['p99_ratio']}x (max_size 1: {batching['max_size=1']['rps']} req/s, "
              f"p99 {batching['max_size=1']['p99_ms']} ms)")
    print("gpu-check: " + ("FAILED\n  " + "\n  ".join(failures) if failures else "PASSED"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check.json", help="where the JSON report goes")
    parser.add_argument("--quick", action="store_true",
                        help="3 crossings and 1 chattts instance (a smoke run)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    reason = no_gpu_reason()
    failures: list[str] = []
    code = 0
    if reason is not None:
        report: dict[str, Any] = {"skipped": reason}
    else:
        try:
            report, failures = run(3 if args.quick else 10, [1] if args.quick else [1, 2],
                                  args.quick)
            code = 1 if failures else 0
        except SetupError as exc:
            report, code = {"error": str(exc)}, 2
            print(f"gpu-check: cannot run: {exc}", file=sys.stderr)
    report["failures"] = failures
    report["duration_s"] = round(time.monotonic() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if code != 2:
        print_report(report, failures)
    print(f"report: {os.path.abspath(args.out)} ({report['duration_s']} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
