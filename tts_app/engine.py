"""From a validated request to audio: cache, single-flight, admission, backend, logs.

A :class:`Flight` is one synthesis in progress. Identical requests (same cache key) that
arrive while it runs follow the same flight instead of synthesizing again, and streaming and
buffered consumers read the same chunks, so a burst of a popular text costs one model run.
The backend generator runs in a worker thread; chunks and stage timings hop back to the event
loop, which owns every piece of state here (no locks needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tts_app import audio
from tts_app.admission import Admission
from tts_app.backends.base import Backend, SynthesisRequest
from tts_app.cache import DiskCache, cache_key
from tts_app.errors import AppError, SynthesisError
from tts_app.logging import StructuredLog
from tts_app.store.audio import SharedAudio
from tts_app.validation import TtsSpec


@dataclass(eq=False)
class Flight:
    """Chunks (PCM16 bytes) of one synthesis, readable by any number of consumers."""

    key: str
    request_id: str
    chunks: list[bytes] = field(default_factory=list)
    done: bool = False
    error: AppError | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._changed.set()

    def finish(self, error: AppError | None = None) -> None:
        self.done, self.error = True, error
        self._changed.set()

    async def stream(self) -> AsyncIterator[bytes]:
        """Every chunk in order, waiting for new ones; raises the flight's error at its end."""
        index = 0
        while True:
            while index < len(self.chunks):
                index += 1
                yield self.chunks[index - 1]
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            self._changed.clear()
            await self._changed.wait()

    async def pcm(self) -> bytes:
        return b"".join([chunk async for chunk in self.stream()])


@dataclass(frozen=True, slots=True)
class Hit:
    """Audio already finished (cache or a flight that just completed): the full body."""

    body: bytes


class SynthesisService:
    def __init__(self, backend: Backend, cache: DiskCache | None, admission: Admission,
                 log: StructuredLog, timeout_s: float) -> None:
        self.backend = backend
        self.cache = cache
        self.admission = admission
        self.log = log
        self.timeout_s = timeout_s
        self.flights: dict[str, Flight] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=max(1, backend.instances),
                                        thread_name_prefix="synth")

    def key(self, spec: TtsSpec) -> str:
        return cache_key(self.backend.name, self.backend.model_version, spec.voice, spec.lang,
                         spec.text, spec.params, spec.format)

    # The audio cache shared with other replicas; None: this replica's cache only.
    shared: SharedAudio | None = None

    async def begin(self, spec: TtsSpec, request_id: str, bounded: bool = True) -> Hit | Flight:
        """:meth:`start`, asking the shared cache first when nothing here has the audio (this
        may wait for another replica's synthesis of it); a new synthesis is shared when done."""
        key = self.key(spec)
        if self.shared is not None and key not in self.flights and (
                self.cache is None or self.cache.get(key) is None):
            body = await self.shared.lookup(key, spec.format)
            if body is not None:
                if self.cache is not None:
                    self.cache.put(key, body)
                self._log_start(spec, request_id, cache_hit=True)
                self._log_hit(spec, request_id, len(body))
                return Hit(body)
        try:
            started = self.start(spec, request_id, bounded)
        except AppError:
            if self.shared is not None:      # refused here: let another replica have it
                self.shared.give_up(key)
            raise
        if self.shared is not None and isinstance(started, Flight) \
                and started.request_id == request_id:
            sample_rate = self.backend.sample_rate
            self.shared.publish_when_done(key, started.pcm(), lambda pcm: audio.encode(
                pcm, sample_rate, spec.format))
        return started

    def start(self, spec: TtsSpec, request_id: str, bounded: bool = True) -> Hit | Flight:
        """Answer from the cache, join an identical flight, or start a new one.

        Raises QUEUE_FULL (before anything is logged as a synthesis) when admission refuses.
        """
        key = self.key(spec)
        body = self.cache.get(key) if self.cache is not None else None
        if body is not None:
            self._log_start(spec, request_id, cache_hit=True)
            self._log_hit(spec, request_id, len(body))
            return Hit(body)
        flight = self.flights.get(key)
        if flight is not None:
            self._log_start(spec, request_id, cache_hit=True)
            return flight
        self.admission.reserve(bounded)
        flight = Flight(key, request_id)
        self.flights[key] = flight
        self._log_start(spec, request_id, cache_hit=False)
        task = asyncio.get_running_loop().create_task(self._run(spec, flight))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return flight

    def follower_done(self, spec: TtsSpec, request_id: str, flight: Flight, size: int,
                      error: AppError | None = None) -> None:
        """Log the synthesis_complete of a request that shared another's flight, so every
        synthesis_start has exactly one synthesis_complete (the leader's is logged by _run)."""
        if flight.request_id == request_id:
            return
        if error is None:
            self._log_hit(spec, request_id, size, shared=True)
        else:
            self.log.event("synthesis_complete", request_id, level="ERROR", status="failed",
                           duration_ms=0.0, error_code=error.code, cache_hit=True,
                           cache_saved=False, audio_size_kb=0, audio_duration_ms=0,
                           text_len=len(spec.text), model_stage="shared", shared=True)

    async def collect(self, spec: TtsSpec, request_id: str, flight: Flight) -> bytes:
        """The encoded body of a flight, once it finished (logs a follower's outcome)."""
        try:
            pcm = await flight.pcm()
        except AppError as exc:
            self.follower_done(spec, request_id, flight, 0, exc)
            raise
        body = audio.encode(pcm, self.backend.sample_rate, spec.format)
        self.follower_done(spec, request_id, flight, len(body))
        return body

    async def render(self, spec: TtsSpec, request_id: str, bounded: bool = True) -> bytes:
        """The whole response body (jobs and non-streaming requests)."""
        started = await self.begin(spec, request_id, bounded)
        if isinstance(started, Hit):
            return started.body
        return await self.collect(spec, request_id, started)

    # --- logging helpers
    def _log_start(self, spec: TtsSpec, request_id: str, cache_hit: bool) -> None:
        self.log.event("synthesis_start", request_id, text_len=len(spec.text), lang=spec.lang,
                       voice=spec.voice, cache_hit=cache_hit)

    def _log_hit(self, spec: TtsSpec, request_id: str, size: int, shared: bool = False) -> None:
        header = 44 if spec.format == "wav" else 0
        extra: dict[str, Any] = {"shared": True} if shared else {}
        self.log.event("synthesis_complete", request_id, status="success", duration_ms=0.0,
                       error_code="none", cache_hit=True, cache_saved=False,
                       audio_size_kb=round(size / 1024, 1),
                       audio_duration_ms=round(audio.pcm_duration_ms(
                           max(0, size - header), self.backend.sample_rate), 1),
                       text_len=len(spec.text), model_stage="cache", **extra)

    # --- the synthesis itself
    async def _run(self, spec: TtsSpec, flight: Flight) -> None:
        loop = asyncio.get_running_loop()
        request_id = flight.request_id
        stages: list[tuple[str, float]] = []
        started = time.perf_counter()
        error: AppError | None = None
        error_stage = ""
        metrics: tuple[float, float] = (0.0, 0.0)
        try:
            await self.admission.acquire()
        except BaseException:
            self.flights.pop(flight.key, None)
            flight.finish(AppError("MODEL_NOT_READY", "service stopped"))
            raise
        try:
            started = time.perf_counter()
            request = SynthesisRequest(request_id, spec.text, spec.voice, spec.lang,
                                       spec.params)
            future = loop.run_in_executor(self._pool, self._work, request, flight, loop, stages)
            metrics = await asyncio.wait_for(future, self.timeout_s)
        except SynthesisError as exc:
            error, error_stage = AppError(exc.code, exc.message,
                                          self.admission.retry_after_s), exc.stage or ""
        except asyncio.TimeoutError:
            error = AppError("MODEL_ERROR", f"synthesis took longer than {self.timeout_s}s",
                             self.admission.retry_after_s)
        except Exception as exc:   # a backend bug must still answer 503, never a bare 500
            error = AppError("MODEL_ERROR", f"{type(exc).__name__}: {exc}",
                             self.admission.retry_after_s)
            self.log.event("backend_exception", request_id, level="ERROR",
                           error_code="MODEL_ERROR", exception_type=type(exc).__name__,
                           exception_msg=str(exc), traceback=traceback.format_exc())
        finally:
            self.admission.release()
        duration_ms = (time.perf_counter() - started) * 1000
        for stage, stage_ms in stages:
            self.log.event("stage_time", request_id, stage=stage, duration_ms=round(stage_ms, 3))
        pcm = b"".join(flight.chunks)
        if error is None:
            self._finish_ok(spec, flight, pcm, duration_ms, stages, metrics)
        else:
            self.log.event("synthesis_complete", request_id, level="ERROR", status="failed",
                           duration_ms=round(duration_ms, 3), error_code=error.code,
                           cache_hit=False, cache_saved=False, audio_size_kb=0,
                           audio_duration_ms=0, text_len=len(spec.text),
                           model_stage=error_stage or (stages[-1][0] if stages else "none"),
                           message=error.message)
        self.flights.pop(flight.key, None)
        flight.finish(error)

    def _finish_ok(self, spec: TtsSpec, flight: Flight, pcm: bytes, duration_ms: float,
                   stages: list[tuple[str, float]], metrics: tuple[float, float]) -> None:
        request_id = flight.request_id
        self.log.event("audio_metrics", request_id, rms=round(metrics[0], 6),
                       spectral_centroid=round(metrics[1], 1))
        body = audio.encode(pcm, self.backend.sample_rate, spec.format)
        saved = False
        if self.cache is not None:
            problem = self.cache.put(flight.key, body)
            saved = problem is None
            if problem is not None:
                self.log.event("cache_write_failed", request_id, level="WARNING",
                               warning_code="CACHE_WRITE_FAILED", path=str(self.cache.directory),
                               errno=problem.errno, message=str(problem))
        self.log.event("synthesis_complete", request_id, status="success",
                       duration_ms=round(duration_ms, 3), error_code="none", cache_hit=False,
                       cache_saved=saved, audio_size_kb=round(len(body) / 1024, 1),
                       audio_duration_ms=round(audio.pcm_duration_ms(
                           len(pcm), self.backend.sample_rate), 1),
                       text_len=len(spec.text),
                       model_stage=stages[-1][0] if stages else "none")

    def _work(self, request: SynthesisRequest, flight: Flight, loop: asyncio.AbstractEventLoop,
              stages: list[tuple[str, float]]) -> tuple[float, float]:
        """Worker thread: drive the backend generator, hand chunks to the loop as they come."""
        collected: list[np.ndarray] = []

        def on_stage(stage: str, duration_ms: float) -> None:
            stages.append((stage, duration_ms))   # list.append is atomic; read after join

        for chunk in self.backend.synthesize(request, on_stage):
            samples = np.asarray(chunk, dtype=np.float32).reshape(-1)
            collected.append(samples)
            loop.call_soon_threadsafe(flight.push, audio.to_pcm16(samples))
        if not collected:
            raise SynthesisError("MODEL_ERROR", "backend produced no audio", stage="audio_render")
        whole = np.concatenate(collected)
        return audio.rms(whole), audio.spectral_centroid(whole, self.backend.sample_rate)

    async def drain(self, timeout_s: float) -> None:
        """Wait for every running synthesis (used by graceful shutdown)."""
        if self.tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True),
                                       timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, Any]:
        return {"waiting": self.admission.waiting, "running": self.admission.running,
                "capacity": self.admission.capacity}
