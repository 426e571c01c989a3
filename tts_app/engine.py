"""From a validated request to audio: cache, single-flight, admission, backend, logs.

A :class:`Flight` is one synthesis in progress. Identical requests (same cache key) that
arrive while it runs follow the same flight instead of synthesizing again, and streaming and
buffered consumers read the same chunks, so a burst of a popular text costs one model run.
The backend generator runs in a worker thread; chunks and stage timings hop back to the event
loop, which owns every piece of state here (no locks needed).

A synthesis past ``timeout_s`` is answered 503 at once, but its thread cannot be stopped: the
instance it holds is retired and a replacement loaded, and the admission slot stays taken
until the replacement is in service (or, for an instance the backend could not retire, until
the call returns), so a queued request never waits behind a hung call while ``/status``
counts it as running. With no instance left in service (replacements are capped by
``max_hung_instances``) the service stops being live.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
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
from tts_app.batching import batch_size_of
from tts_app.cache import DiskCache, NotSaved, cache_key
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
                 log: StructuredLog, timeout_s: float, max_hung_instances: int = 1,
                 silence_rms: float = 0.0) -> None:
        self.backend = backend
        self.cache = cache
        self.admission = admission
        self.log = log
        self.timeout_s = timeout_s
        self.max_hung = max_hung_instances
        self.silence_rms = silence_rms
        self.flights: dict[str, Flight] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.instances_total = max(1, backend.instances)
        self.hung = 0         # timed-out calls whose thread has not returned yet
        self.lost = 0         # retired instances not replaced yet (each holds a slot)
        self.held = 0         # hung calls on an instance the backend could not retire
        self._rebuilder: asyncio.Task[None] | None = None
        # Hung threads keep their worker: replacements are loaded only while at most
        # max_hung calls hang, so instances + max_hung workers always leave one per slot.
        self._pool = ThreadPoolExecutor(max_workers=self.instances_total + max_hung_instances,
                                        thread_name_prefix="synth")

    @property
    def instances_healthy(self) -> int:
        return self.instances_total - self.lost - self.held

    @property
    def rebuilding(self) -> bool:
        return self._rebuilder is not None

    @property
    def live(self) -> bool:
        """False once no instance is in service and none is being loaded or may come back."""
        return self.instances_healthy > 0 or self.rebuilding or self.held > 0

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

        Raises QUEUE_FULL (before anything is logged as a synthesis) when admission refuses,
        MODEL_NOT_READY when no model instance is left in service.
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
        if not self.live:
            raise AppError("MODEL_NOT_READY", "no model instance is in service",
                           self.admission.retry_after_s)
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
            self._log_complete(spec, request_id, error, 0.0, None, cache_hit=True,
                               cache_skip="shared", model_stage="shared", shared=True)

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
        self._log_complete(spec, request_id, None, 0.0, None, cache_hit=True,
                           cache_skip="shared" if shared else "hit", model_stage="cache",
                           size=size, pcm_bytes=max(0, size - header), **extra)

    def _log_complete(self, spec: TtsSpec, request_id: str, error: AppError | None,
                      duration_ms: float, queue_ms: float | None, cache_hit: bool,
                      model_stage: str, cache_skip: str = "", size: int = 0,
                      pcm_bytes: int = 0, **extra: Any) -> None:
        """The one synthesis_complete line of a request. ``queue_ms`` (time waited for a model
        instance) is left out for requests that never asked for one (cache hits, shared
        syntheses): their zeros would hide queueing in the wait histogram under a cache-heavy
        load. ``cache_skip`` says why the audio is not on disk (empty when it is)."""
        fields: dict[str, Any] = {
            "status": "success" if error is None else "failed",
            "duration_ms": round(duration_ms, 3)}
        if queue_ms is not None:
            fields["queue_ms"] = round(queue_ms, 3)
        fields.update(error_code="none" if error is None else error.code, cache_hit=cache_hit,
                      cache_saved=not cache_skip)
        if cache_skip:
            fields["cache_skip"] = cache_skip
        fields.update(
            audio_size_kb=round(size / 1024, 1),
            audio_duration_ms=round(audio.pcm_duration_ms(pcm_bytes, self.backend.sample_rate), 1),
            text_len=len(spec.text), model_stage=model_stage,
            model_version=self.backend.model_version, **extra)
        if error is not None:
            fields["message"] = error.message
        self.log.event("synthesis_complete", request_id,
                       level="INFO" if error is None else "ERROR", **fields)

    # --- the synthesis itself
    async def _run(self, spec: TtsSpec, flight: Flight) -> None:
        request_id = flight.request_id
        stages: list[tuple[str, float]] = []
        queued = time.perf_counter()
        try:
            await self.admission.acquire()
        except BaseException:
            self.flights.pop(flight.key, None)
            flight.finish(AppError("MODEL_NOT_READY", "service stopped"))
            raise
        started = time.perf_counter()
        error: AppError | None = None
        error_stage = ""
        metrics: tuple[float, float] = (0.0, 0.0)
        slot_kept = False
        request = SynthesisRequest(request_id, spec.text, spec.voice, spec.lang, spec.params)
        abandoned = threading.Event()
        work = asyncio.wrap_future(self._pool.submit(
            self._work, request, flight, asyncio.get_running_loop(), stages, abandoned))
        try:
            metrics = await asyncio.wait_for(asyncio.shield(work), self.timeout_s)
        except SynthesisError as exc:
            error, error_stage = AppError(exc.code, exc.message,
                                          self.admission.retry_after_s), exc.stage or ""
        except asyncio.TimeoutError:
            abandoned.set()
            error = AppError("MODEL_ERROR", f"synthesis took longer than {self.timeout_s}s",
                             self.admission.retry_after_s)
            self._abandon(request, work)
            slot_kept = True
        except Exception as exc:   # a backend bug must still answer 503, never a bare 500
            error = AppError("MODEL_ERROR", f"{type(exc).__name__}: {exc}",
                             self.admission.retry_after_s)
            self.log.event("backend_exception", request_id, level="ERROR",
                           error_code="MODEL_ERROR", exception_type=type(exc).__name__,
                           exception_msg=str(exc), traceback=traceback.format_exc())
        finally:
            self.admission.release(keep_slot=slot_kept)
        duration_ms = (time.perf_counter() - started) * 1000
        batch_size = batch_size_of(self.backend, request)
        queue_ms = (started - queued) * 1000
        for stage, stage_ms in list(stages):
            self.log.event("stage_time", request_id, stage=stage, duration_ms=round(stage_ms, 3))
        if error is None:
            self._finish_ok(spec, flight, duration_ms, queue_ms, stages, metrics, batch_size)
        else:
            self._log_complete(spec, request_id, error, duration_ms, queue_ms, cache_hit=False,
                               cache_skip="failed",
                               model_stage=error_stage or (stages[-1][0] if stages else "none"),
                               batch_size=batch_size)
        self.flights.pop(flight.key, None)
        flight.finish(error)

    def _finish_ok(self, spec: TtsSpec, flight: Flight, duration_ms: float, queue_ms: float,
                   stages: list[tuple[str, float]], metrics: tuple[float, float],
                   batch_size: int = 1) -> None:
        request_id = flight.request_id
        rms = metrics[0]
        self.log.event("audio_metrics", request_id, rms=round(rms, 6),
                       spectral_centroid=round(metrics[1], 1))
        pcm = b"".join(flight.chunks)
        body = audio.encode(pcm, self.backend.sample_rate, spec.format)
        skip = self._store(flight, body, silent=rms < self.silence_rms)
        self._log_complete(spec, request_id, None, duration_ms, queue_ms, cache_hit=False,
                           cache_skip=skip, model_stage=stages[-1][0] if stages else "none",
                           size=len(body), pcm_bytes=len(pcm), batch_size=batch_size)

    def _store(self, flight: Flight, body: bytes, silent: bool) -> str:
        """Cache ``body``; returns why it is not on disk ("" when it is). Silent audio is
        answered (the text may be only punctuation) but warned about and never cached, so a
        model that briefly produced silence does not keep serving it."""
        if silent:
            self.log.event("audio_silent", flight.request_id, level="WARNING",
                           warning_code="AUDIO_SILENT", threshold=self.silence_rms)
            return "silent"
        if self.cache is None:
            return "disabled"
        problem: NotSaved | None = self.cache.put(flight.key, body)
        if problem is None:
            return ""
        if problem.error is not None:
            self.log.event("cache_write_failed", flight.request_id, level="WARNING",
                           warning_code="CACHE_WRITE_FAILED", path=str(self.cache.directory),
                           errno=problem.error.errno, message=str(problem.error))
        return problem.reason

    def _work(self, request: SynthesisRequest, flight: Flight, loop: asyncio.AbstractEventLoop,
              stages: list[tuple[str, float]], abandoned: threading.Event
              ) -> tuple[float, float]:
        """Worker thread: drive the backend generator, hand chunks to the loop as they come.

        Once the loop has given up on this call (``abandoned``), the generator is closed at
        its next chunk, so the backend's instance is released as early as the model allows.
        """
        collected: list[np.ndarray] = []

        def on_stage(stage: str, duration_ms: float) -> None:
            stages.append((stage, duration_ms))   # list.append is atomic; read after join

        chunks = self.backend.synthesize(request, on_stage)
        try:
            for chunk in chunks:
                if abandoned.is_set():
                    return 0.0, 0.0
                samples = np.asarray(chunk, dtype=np.float32).reshape(-1)
                collected.append(samples)
                loop.call_soon_threadsafe(flight.push, audio.to_pcm16(samples))
        finally:
            getattr(chunks, "close", lambda: None)()   # generators release their instance
        if not collected:
            raise SynthesisError("MODEL_ERROR", "backend produced no audio", stage="audio_render")
        whole = np.concatenate(collected)
        return audio.rms(whole), audio.spectral_centroid(whole, self.backend.sample_rate)

    # --- instances whose synthesis hung
    def _abandon(self, request: SynthesisRequest,
                 work: asyncio.Future[tuple[float, float]]) -> None:
        """Take a timed-out call's instance out of service; its admission slot stays taken
        until a replacement is loaded (retired) or the call returns (not retired)."""
        retired = self.backend.retire(request)
        self.hung += 1
        if retired:
            self.lost += 1
        else:
            self.held += 1
        # Own codes, so tts_log_records_total tells hangs apart from the request's MODEL_ERROR.
        self.log.event("instance_hung", request.request_id, level="ERROR",
                       error_code="MODEL_HUNG", retired=retired, timeout_s=self.timeout_s,
                       instances_healthy=self.instances_healthy, instances_hung=self.hung)
        work.add_done_callback(lambda done: self._hung_returned(done, retired))
        self._maybe_rebuild()

    def _hung_returned(self, work: asyncio.Future[tuple[float, float]], retired: bool) -> None:
        if not work.cancelled():
            work.exception()     # retrieved: nobody awaits a call that was given up on
        self.hung -= 1
        if not retired:          # its instance went back into service with the call
            self.held -= 1
            self.admission.return_slot()
        self.log.event("instance_hung_returned", instances_hung=self.hung,
                       instances_healthy=self.instances_healthy)
        self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        # Not among self.tasks: draining waits for requests, not for a model to load.
        if self.lost and self._rebuilder is None and self.hung <= self.max_hung:
            self._rebuilder = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.rebuild)
        except Exception as exc:   # tried again when a hung call returns
            self.log.event("instance_rebuild_failed", level="ERROR",
                           error_code="MODEL_REBUILD_FAILED",
                           exception_type=type(exc).__name__, exception_msg=str(exc),
                           instances_healthy=self.instances_healthy)
            return
        finally:
            self._rebuilder = None
        self.lost -= 1
        self.admission.return_slot()
        self.log.event("instance_rebuilt", instances_healthy=self.instances_healthy,
                       duration_ms=round((time.perf_counter() - started) * 1000, 1))
        self._maybe_rebuild()

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
                "capacity": self.admission.capacity,
                "instances_total": self.instances_total,
                "instances_healthy": self.instances_healthy, "instances_hung": self.hung}
