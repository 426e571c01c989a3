"""Batched vs unbatched ChatTTS (issue 20): throughput and latency at 8 concurrent clients.

One tiny ChatTTS model (tests/app/chattts_tiny.py; random weights, real code path) is
loaded once and serves both arms through the real engine (admission, worker pool, logs; no
cache): ``batch.max_size`` 1 (the backend alone) and ``batch.max_size`` 8 (behind
tts_app.batching). Eight clients each send distinct texts back to back; the arms alternate
round by round so a busy machine slows both alike. Reported per arm: requests/s, p50/p99
latency, the mean ``batch_size`` logged; then the ratios against the goal (throughput
>= 2.5x, p99 <= 1.5x the unbatched p99).

    python tests/bench/bench_batch.py                 # CPU, 4 rounds x 4 requests per client
    python tests/bench/bench_batch.py --quick         # 2 rounds x 2
    python tests/bench/bench_batch.py --device cuda   # the same on a GPU

torch runs ``--threads`` CPU threads (default 1) so both arms get the same compute.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.app.chattts_tiny import build_tiny_assets, configure
from tests.bench.bench_app import percentile
from tts_app.admission import Admission
from tts_app.backends.base import Backend
from tts_app.backends.chattts import ChatTTSBackend
from tts_app.batching import with_batching
from tts_app.config import BatchConfig
from tts_app.engine import SynthesisService
from tts_app.logging import StructuredLog
from tts_app.validation import validate

CLIENTS = 8
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima"]


def text_for(arm: str, client: int, index: int) -> str:
    """Distinct per request (no two share a flight), similar in length, letters only."""
    tag = "batched" if arm.endswith(f"={CLIENTS}") else "alone"
    words = [WORDS[client % len(WORDS)], WORDS[index % len(WORDS)],
             WORDS[index // len(WORDS) % len(WORDS)]]
    return f"{tag} {' '.join(words)}."


async def run_round(service: SynthesisService, arm: str, per_client: int, offset: int
                    ) -> tuple[list[float], float]:
    voices, langs = service.backend.voices, ["en"]

    async def client(number: int) -> list[float]:
        latencies = []
        for i in range(offset, offset + per_client):
            spec = validate({"text": text_for(arm, number, i)}, 2000, voices, langs)
            started = time.perf_counter()
            await service.render(spec, f"{arm}-{number}-{i}")
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    started = time.perf_counter()
    results = await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return [ms for result in results for ms in result], time.perf_counter() - started


def make_service(backend: Backend, log_path: Path) -> SynthesisService:
    admission = Admission(max(1, backend.instances), queue_size=4 * CLIENTS, retry_after_s=1)
    return SynthesisService(backend, None, admission, StructuredLog(log_path), timeout_s=600)


def batch_sizes(log_path: Path) -> list[int]:
    records = (json.loads(line) for line in log_path.read_text().splitlines() if line)
    return [r["batch_size"] for r in records if r.get("event") == "synthesis_complete"]


async def bench(model: ChatTTSBackend, workdir: Path, rounds: int, per_client: int,
                wait_ms: float) -> dict[str, Any]:
    arms = {f"max_size={size}": with_batching(model, BatchConfig(max_size=size,
                                                                 max_wait_ms=wait_ms))
            for size in (1, CLIENTS)}
    services = {name: make_service(backend, workdir / f"{name}.log")
                for name, backend in arms.items()}
    latencies: dict[str, list[float]] = {name: [] for name in arms}
    seconds = dict.fromkeys(arms, 0.0)
    await run_round(services["max_size=1"], "warm", 1, 0)         # first-call costs
    for number in range(rounds):
        for name, service in services.items():
            values, elapsed = await run_round(service, name, per_client, number * per_client)
            latencies[name] += values
            seconds[name] += elapsed
    for service in services.values():
        service.close()
    report: dict[str, Any] = {}
    for name in arms:
        sizes = batch_sizes(workdir / f"{name}.log")
        report[name] = {"requests": len(latencies[name]),
                        "rps": round(len(latencies[name]) / seconds[name], 2),
                        "p50_ms": round(percentile(latencies[name], 50), 1),
                        "p99_ms": round(percentile(latencies[name], 99), 1),
                        "mean_batch_size": round(sum(sizes) / max(1, len(sizes)), 2)}
    alone, batched = report["max_size=1"], report[f"max_size={CLIENTS}"]
    report["throughput_ratio"] = round(batched["rps"] / alone["rps"], 2)
    report["p99_ratio"] = round(batched["p99_ms"] / alone["p99_ms"], 2)
    report["goal_met"] = report["throughput_ratio"] >= 2.5 and report["p99_ratio"] <= 1.5
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--max-new-token", type=int, default=48, help="audio tokens per text")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="batch.max_wait_ms")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rounds, per_client = (2, 2) if args.quick else (4, 4)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        workdir = Path(tmp)
        model_dir = build_tiny_assets(workdir / "model")
        model = ChatTTSBackend(model_dir=str(model_dir), device=args.device,
                               max_new_token=args.max_new_token,
                               config_hook=functools.partial(configure, directory=model_dir))
        model.load()
        report = asyncio.run(bench(model, workdir, rounds, per_client, args.wait_ms))
        model.close()
    report["config"] = {"clients": CLIENTS, "rounds": rounds, "per_client": per_client,
                        "device": args.device, "threads": args.threads,
                        "max_new_token": args.max_new_token, "max_wait_ms": args.wait_ms}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
