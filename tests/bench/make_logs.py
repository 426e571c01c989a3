"""Realistic mixed TTS logs for benchmarks and demos: both contract formats, every event.

Each synthesis request writes what the co-packaged app writes (http_request, synthesis_start,
four stage_time, audio_metrics, synthesis_complete); a share of requests is written in the
IndexTTS text format, some fail with the seed's error codes (with an ERROR line and a
traceback), some hit the cache, and a few lines are broken. Deterministic for a seed.

    python tests/bench/make_logs.py OUT.log --lines 1000000
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

STAGES = ("text_normalize", "llm_prompt_gen", "llm_inference", "audio_render")
ERRORS = ("SCIPY_FFT_INVALID", "GPU_OOM", "MODEL_ERROR")
TEXT_LENGTHS = (12, 40, 86, 150, 400, 900, 2048)


def _json(stamp: str, level: str, event: str, rid: str, **fields: object) -> str:
    record: dict[str, object] = {"time": f"2026-11-22T{stamp}+00:00", "level": level,
                                 "logger": "tts_app", "event": event, "request_id": rid}
    record.update(fields)
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def _text(stamp: str, level: str, event: str, rid: str, **fields: object) -> str:
    pairs = ", ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    return f"2026-11-22 {stamp.replace('.', ',')} - app.tts_engine - {level} - {event}: " \
           f"id={rid}, {pairs}"


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and ("," in value or " " in value):
        return '"' + value + '"'
    return str(value)


def request_lines(rnd: random.Random, n: int) -> list[str]:
    """The lines one synthesis request writes."""
    rid = f"ts_{n:08x}"
    stamp = f"{10 + n // 3_600_000 % 14:02d}:{n // 60_000 % 60:02d}:{n // 1000 % 60:02d}." \
            f"{n % 1000:03d}"
    write = _text if rnd.random() < 0.4 else _json
    text_len = rnd.choice(TEXT_LENGTHS)
    cache_hit = rnd.random() < 0.3
    failed = not cache_hit and (text_len == 2048 or rnd.random() < 0.02)
    lines = [write(stamp, "INFO", "synthesis_start", rid, text_len=text_len, lang="en",
                   voice="default", cache_hit=cache_hit)]
    duration = 3 if cache_hit else rnd.randint(200, 1500)
    if not cache_hit:
        for stage in STAGES:
            lines.append(write(stamp, "INFO", "stage_time", rid, stage=stage,
                               duration_ms=round(duration * rnd.uniform(0.05, 0.5), 1)))
    if failed:
        code = "SCIPY_FFT_INVALID" if text_len == 2048 else rnd.choice(ERRORS)
        lines.append(f"2026-11-22 {stamp.replace('.', ',')} - app.tts_engine - ERROR - "
                     f"ERROR: scipy.fft failed on input len={text_len}, exc=RuntimeWarning: "
                     "invalid value encountered")
        lines += ["Traceback (most recent call last):",
                  '  File "tts_engine.py", line 212, in postprocess',
                  "RuntimeWarning: invalid value encountered"]
        lines.append(write(stamp, "ERROR", "synthesis_complete", rid, status="failed",
                           duration_ms=duration, error_code=code, text_len=text_len,
                           model_stage="llm_postproc", cache_hit=False, cache_saved=False))
        status = 503
    else:
        audio_ms = text_len * 70
        if not cache_hit:
            lines.append(write(stamp, "INFO", "audio_metrics", rid,
                               rms=round(rnd.uniform(0.05, 0.2), 4),
                               spectral_centroid=round(rnd.uniform(900, 2600), 1)))
        lines.append(write(stamp, "INFO", "synthesis_complete", rid, status="success",
                           duration_ms=duration, error_code="none", cache_hit=cache_hit,
                           cache_saved=not cache_hit, audio_size_kb=audio_ms // 23,
                           audio_duration_ms=audio_ms, text_len=text_len,
                           model_stage="audio_render"))
        status = 200
    lines.append(write(stamp, "INFO", "http_request", rid, method="POST", route="/v1/tts",
                       status=status, duration_ms=duration + 2))
    if rnd.random() < 0.002:
        lines.append('{"time": "2026-11-22T10:00:00", "event": "broken')
    return lines


def generate(count: int, seed: int = 7) -> Iterator[str]:
    """Exactly ``count`` lines (the last request may be cut short)."""
    rnd = random.Random(seed)
    written, n = 0, 0
    while written < count:
        for line in request_lines(rnd, n):
            if written == count:
                return
            yield line
            written += 1
        n += 1


def write_log(path: Path, count: int, seed: int = 7) -> Path:
    return write_lines(path, generate(count, seed))


def synthesis_text_lines(count: int, seed: int = 7) -> Iterator[str]:
    """``count`` IndexTTS text-format ``synthesis_complete`` lines, as its deployments write
    them (the format of the log-monitoring notes): the live text-ingest benchmark's file."""
    rnd = random.Random(seed)
    for n in range(count):
        stamp = f"{10 + n // 3_600_000 % 14:02d}:{n // 60_000 % 60:02d}:" \
                f"{n // 1000 % 60:02d},{n % 1000:03d}"
        status = "failed" if rnd.random() < 0.03 else "success"
        saved = "true" if rnd.random() < 0.7 else "false"
        yield (f"2026-11-22 {stamp} - app.tts_engine - INFO - synthesis_complete: "
               f"id=ts_{n:08x}, status={status}, duration_ms={rnd.randint(200, 4000)}, "
               f"audio_size_kb={rnd.randint(20, 400)}, cache_saved={saved}, "
               "model_stage=llm_postproc")


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    with path.open("w", encoding="utf-8") as out:
        batch: list[str] = []
        for line in lines:
            batch.append(line)
            if len(batch) == 10_000:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    write_log(args.out, args.lines, args.seed)


if __name__ == "__main__":
    main()
