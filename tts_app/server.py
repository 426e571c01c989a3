"""The HTTP surface: routes, the request-id/logging/error middleware, readiness and drain.

Routes:
- ``POST /v1/tts`` JSON ``{text, voice, lang, format: wav|pcm, stream, params}`` -> audio;
  ``stream: true`` sends a chunked body (WAV header with unknown length, then chunks).
  ``X-Cache: hit|miss|shared`` says whether the audio came from the cache, a new synthesis,
  or an identical request's synthesis in flight.
- ``POST /v1/tts/jobs`` (same body; optional ``Idempotency-Key``) -> 202 ``{id, status}``;
  ``GET /v1/tts/jobs/{id}`` -> the audio once done (JSON status before, or with
  ``Accept: application/json``).
- ``/healthz`` (process up), ``/readyz`` (model loaded and warmed up, not draining),
  ``/status`` (queue figures for the sidecar's probe).

Every response is either audio or the JSON error body ``{"error": {"code", "message",
"request_id"}}`` with a code from :mod:`tts_app.errors`; overload and gate answers carry
Retry-After. Exactly one ``http_request`` line is logged per request, from the middleware.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tts_app import __version__, audio
from tts_app.admission import Admission, GateWatcher, RateLimiter
from tts_app.backends.base import Backend, SynthesisParams, SynthesisRequest, gpu_status
from tts_app.cache import DiskCache
from tts_app.config import AppConfig
from tts_app.engine import Flight, Hit, SynthesisService
from tts_app.errors import ERRORS, AppError
from tts_app.identity import ClientIdentity
from tts_app.jobs import Job, JobStore, idempotency_key
from tts_app.logging import StructuredLog
from tts_app.store import open_store
from tts_app.store.audio import SharedAudio
from tts_app.store.jobs import RemoteJob, SharedJobs
from tts_app.validation import TtsSpec, parse_body, validate

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SYNTHESIS_ERRORS = frozenset(("GPU_OOM", "MODEL_ERROR"))   # logged by synthesis_complete
# Overload answers held for admission.shed_delay_s: a client that retries at once without
# honouring Retry-After would otherwise turn every spare CPU cycle into more rejections.
SHED = frozenset(("QUEUE_FULL", "RATE_LIMITED"))
_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "BODY_TOO_LARGE"}


class AppState:
    """Everything a handler needs, built once per process."""

    def __init__(self, config: AppConfig, backend: Backend, log: StructuredLog,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.backend = backend
        self.log = log
        self.admission = Admission(max(1, backend.instances), config.admission.queue_size,
                                   config.admission.retry_after_s)
        self.cache = self._open_cache(config)
        self.service = SynthesisService(backend, self.cache, self.admission, log,
                                        config.backend.timeout_s,
                                        config.backend.max_hung_instances,
                                        config.audio.silence_rms)
        self.gate = GateWatcher(
            config.gate.file, config.gate.check_interval_s, config.gate.default_retry_after_s,
            clock, on_invalid=lambda problem: log.event(
                "gate_file_invalid", level="WARNING", warning_code="GATE_FILE_INVALID",
                path=config.gate.file, message=f"{problem}; keeping the last good state"))
        rate = config.admission.rate_limit
        self.limiter = RateLimiter(rate.rate_per_s, rate.burst, rate.max_clients,
                                   rate.global_rate_per_s, rate.global_burst, clock) \
            if rate.enabled else None
        self.identity = ClientIdentity(config.identity.trusted_proxies,
                                       config.identity.client_header)
        self.jobs = JobStore(lambda spec, rid: self.service.render(spec, rid, bounded=False),
                             config.jobs.max_pending, config.jobs.max_kept, config.jobs.ttl_s,
                             config.admission.retry_after_s, config.jobs.max_bytes)
        self.store = open_store(config.store, log)
        if self.store.shared:
            self.service.shared = SharedAudio(self.store, config.store)
            self.jobs.shared = SharedJobs(self.store, config.jobs.ttl_s)
        self.ready = False
        self.failed: str | None = None
        self.draining = False
        self.active = 0
        self.started_at = time.time()
        self.settled = asyncio.Event()      # set when warm-up succeeded or failed
        self.warm_task: asyncio.Task[None] | None = None

    def _open_cache(self, config: AppConfig) -> DiskCache | None:
        if not config.cache.enabled:
            return None
        try:
            os.makedirs(config.cache.dir, exist_ok=True)
        except OSError as exc:
            # Serving without a writable cache beats not serving; every failed write warns.
            self.log.event("cache_unavailable", level="WARNING",
                           warning_code="CACHE_WRITE_FAILED", path=config.cache.dir,
                           message=str(exc))
        return DiskCache(config.cache.dir, config.cache.max_bytes, config.cache.memory_max_bytes)

    @property
    def languages(self) -> frozenset[str]:
        return frozenset(getattr(self.backend, "languages", None) or self.config.limits.languages)

    async def warm_up(self) -> None:
        """Load the model and run one synthesis before /readyz says yes."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            await loop.run_in_executor(None, self.backend.load)
            voice = "default" if "default" in self.backend.voices else min(self.backend.voices)
            lang = "en" if "en" in self.languages else min(self.languages)
            request = SynthesisRequest("warmup", self.config.backend.warmup_text, voice, lang,
                                       SynthesisParams(seed=0))
            await loop.run_in_executor(
                None, lambda: list(self.backend.synthesize(request, lambda _s, _d: None)))
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            self.log.event("model_load_failed", level="ERROR", error_code="MODEL_NOT_READY",
                           backend=self.backend.name, exception_type=type(exc).__name__,
                           exception_msg=str(exc), traceback=traceback.format_exc())
        else:
            self.ready = True
            self.log.event("model_ready", backend=self.backend.name,
                           model_version=self.backend.model_version,
                           duration_ms=round((time.perf_counter() - started) * 1000, 1))
        finally:
            self.settled.set()

    async def drain(self) -> None:
        """Stop taking synthesis work, then wait for what is in flight (bounded)."""
        self.draining = True
        deadline = time.monotonic() + self.config.server.drain_timeout_s
        self.log.event("drain_start", active=self.active, running=self.admission.running,
                       waiting=self.admission.waiting)
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        remaining = max(0.0, deadline - time.monotonic())
        await self.service.drain(remaining)
        await self.jobs.drain(max(0.0, deadline - time.monotonic()))
        self.log.event("drain_complete", active=self.active)

    def admit(self, request: web.Request) -> str:
        """Checks every synthesis route makes before reading the body; the client identity."""
        if self.draining:
            raise AppError("SHUTTING_DOWN", retry_after_s=self.config.admission.retry_after_s)
        if not self.ready:
            raise AppError("MODEL_NOT_READY", retry_after_s=self.config.admission.retry_after_s)
        gate = self.gate.current()
        if not gate.open:
            reasons = ", ".join(gate.reasons) or "unspecified"
            raise AppError("INGRESS_CLOSED", f"ingress closed by the resource gate ({reasons})",
                           retry_after_s=gate.retry_after_s)
        client = self.identity.of(request.remote, request.headers)
        if self.limiter is not None:
            self.limiter.check(client)
        return client

    async def read_spec(self, request: web.Request) -> TtsSpec:
        try:
            raw = await asyncio.wait_for(request.read(), self.config.server.body_timeout_s)
        except asyncio.TimeoutError:
            raise AppError("REQUEST_TIMEOUT", f"request body was not received within "
                                              f"{self.config.server.body_timeout_s:g} s") from None
        except web.RequestPayloadError as exc:     # broken chunking or content encoding
            message = " ".join(str(exc).split())
            raise AppError("BAD_REQUEST", f"request body cannot be read ({message})") from None
        return validate(parse_body(raw), self.config.limits.text_max_chars,
                        self.backend.voices, self.languages)


STATE: web.AppKey[AppState] = web.AppKey("state", AppState)
# aiohttp >= 3.12 wants typed request keys; older releases take the plain string.
REQUEST_ID: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") \
    else "request_id"
# Set by _stream when a synthesis fails after the 200 headers went out.
STREAM_ABORTED: Any = web.RequestKey("stream_aborted", AppError) \
    if hasattr(web, "RequestKey") else "stream_aborted"


# Generated request ids: a random per-process prefix and a counter (32 hex digits, unique
# across processes like a uuid4, without a getrandom() call per request).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)

# The error table's code of an error response, for its http_request line (the sidecar splits
# shed from failed requests by it).
ERROR_CODE: Any = web.ResponseKey("error_code", str) if hasattr(web, "ResponseKey") \
    else "error_code"


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    if 0 < len(given) <= 128 and given.isprintable() and given.isascii():
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# The JSON error body of each code with its default message, up to the request id: a shed
# request costs a concatenation, not an encoder run.
_JSON = "application/json; charset=utf-8"
_ERROR_HEADS = {
    code: (f'{{"error": {{"code": {json.dumps(code)}, '
           f'"message": {json.dumps(spec.message, ensure_ascii=False)}, "request_id": ').encode()
    for code, spec in ERRORS.items()}


def error_response(exc: AppError, request_id: str, default_retry: int) -> web.Response:
    if exc.message == exc.spec.message:
        body = _ERROR_HEADS[exc.code] + json.dumps(request_id).encode() + b"}}"
    else:
        body = json.dumps({"error": {"code": exc.code, "message": exc.message,
                                     "request_id": request_id}}, ensure_ascii=False).encode()
    headers = {"Content-Type": _JSON}
    if exc.spec.retryable:
        headers["Retry-After"] = str(exc.retry_after_s or default_retry)
    response = web.Response(status=exc.status, body=body, headers=headers)
    response[ERROR_CODE] = exc.code
    return response


def _log_request(state: AppState, request: web.Request, request_id: str, route: str,
                 status: int, started: float, response: web.StreamResponse | None = None) -> None:
    # A stream that failed after its 200 headers is logged with the status its error would
    # have had, so the service-layer error ratio counts it; status_sent is what went out.
    aborted: AppError | None = request.get(STREAM_ABORTED)
    extra: dict[str, Any] = {} if aborted is None else {
        "outcome": "aborted", "error_code": aborted.code, "status_sent": status}
    if aborted is None and response is not None and ERROR_CODE in response:
        extra["error_code"] = response[ERROR_CODE]
    state.log.event("http_request", request_id, method=request.method, route=route,
                    status=status if aborted is None else aborted.status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3), **extra)


def _rejected(state: AppState, exc: AppError, request_id: str, route: str) -> web.Response:
    """Render an AppError; load shedding and bad input are WARNINGs naming the code (model
    faults are already logged by their synthesis_complete)."""
    if exc.code not in SYNTHESIS_ERRORS:
        state.log.event("request_rejected", request_id, level="WARNING", warning_code=exc.code,
                        route=route, message=exc.message)
    return error_response(exc, request_id, state.config.admission.retry_after_s)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in and out, error rendering, and the one http_request line."""
    state = request.app[STATE]
    started = time.perf_counter()
    hold = False
    request_id = request[REQUEST_ID] = _request_id(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except AppError as exc:
        response = _rejected(state, exc, request_id, route)
        hold = exc.code in SHED and not state.draining \
            and state.config.admission.shed_delay_s > 0
    except web.HTTPException as exc:     # aiohttp's own answers: 404, 405, body too large
        code = _HTTP_CODES.get(exc.status, "BAD_REQUEST")
        response = _rejected(state, AppError(code, f"{ERRORS[code].message} ({exc.reason})"),
                             request_id, route)
    except (asyncio.CancelledError, ConnectionError):
        _log_request(state, request, request_id, route, 499, started)   # client went away
        raise
    except Exception as exc:
        state.log.event("unhandled_exception", request_id, level="ERROR", error_code="INTERNAL",
                        route=route, exception_type=type(exc).__name__, exception_msg=str(exc),
                        traceback=traceback.format_exc())
        response = error_response(AppError("INTERNAL"), request_id, 1)
    if hold:
        try:
            await asyncio.sleep(state.config.admission.shed_delay_s)
        except (asyncio.CancelledError, ConnectionError):
            _log_request(state, request, request_id, route, 499, started)
            raise
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    _log_request(state, request, request_id, route, response.status, started, response)
    return response


def _content_type(spec: TtsSpec | Job | RemoteJob, sample_rate: int) -> str:
    return "audio/wav" if spec.format == "wav" else f"audio/L16; rate={sample_rate}; channels=1"


async def tts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.admit(request)
    state.active += 1
    try:
        spec = await state.read_spec(request)
        request_id = request[REQUEST_ID]
        source = await state.service.begin(spec, request_id)
        if spec.stream:
            return await _stream(request, state, spec, source)
        content_type = _content_type(spec, state.backend.sample_rate)
        if isinstance(source, Hit):
            return web.Response(body=source.body, content_type=None,
                                headers={"Content-Type": content_type, "X-Cache": "hit"})
        body = await state.service.collect(spec, request_id, source)
        shared = source.request_id != request_id
        return web.Response(body=body, headers={"Content-Type": content_type,
                                                "X-Cache": "shared" if shared else "miss"})
    finally:
        state.active -= 1


async def _stream(request: web.Request, state: AppState, spec: TtsSpec,
                  source: Hit | Flight) -> web.StreamResponse:
    """Chunked audio as it is produced: the WAV header, then each chunk; logs first_audio."""
    request_id = request[REQUEST_ID]
    sample_rate = state.backend.sample_rate
    response = web.StreamResponse(headers={
        "Content-Type": _content_type(spec, sample_rate), "X-Request-ID": request_id,
        "X-Cache": "hit" if isinstance(source, Hit) else
        ("miss" if source.request_id == request_id else "shared")})
    response.enable_chunked_encoding()
    started = time.perf_counter()
    if isinstance(source, Hit):
        await response.prepare(request)
        state.log.event("first_audio", request_id,
                        duration_ms=round((time.perf_counter() - started) * 1000, 3))
        await response.write(source.body)
        await response.write_eof()
        return response
    chunks = source.stream()
    try:
        first = await chunks.__anext__()     # an error before any audio is still a JSON error
    except AppError as exc:
        state.service.follower_done(spec, request_id, source, 0, exc)
        raise
    await response.prepare(request)
    header = audio.wav_header(sample_rate, None) if spec.format == "wav" else b""
    await response.write(header + first)
    state.log.event("first_audio", request_id,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3))
    size = len(header) + len(first)
    try:
        async for chunk in chunks:
            await response.write(chunk)
            size += len(chunk)
    except AppError as exc:
        state.log.event("stream_aborted", request_id, level="ERROR", error_code=exc.code,
                        message=exc.message)
        state.service.follower_done(spec, request_id, source, 0, exc)
        request[STREAM_ABORTED] = exc
        if request.transport is not None:
            request.transport.abort()    # a truncated chunked body tells the client it failed
        return response
    await response.write_eof()
    state.service.follower_done(spec, request_id, source, size)
    return response


async def submit_job(request: web.Request) -> web.Response:
    state = request.app[STATE]
    client = state.admit(request)
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    spec = await state.read_spec(request)
    job, created = await state.jobs.submit(spec, request[REQUEST_ID], client, key)
    location = f"/v1/tts/jobs/{job.id}"
    headers = {"Location": location}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response({**job.describe(), "status_url": location}, status=202,
                             headers=headers)


async def get_job(request: web.Request) -> web.Response:
    state = request.app[STATE]
    job = await state.jobs.get(request.match_info["job_id"])
    wants_json = "application/json" in request.headers.get("Accept", "")
    if job.status == "done" and job.body is not None and not wants_json:
        return web.Response(body=job.body, headers={
            "Content-Type": _content_type(job, state.backend.sample_rate),
            "X-Job-Status": "done"})
    return web.json_response(job.describe(), headers={"X-Job-Status": job.status})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 once no model instance is left in service (all hung), so a restart
    is the only way back."""
    if not request.app[STATE].service.live:
        return web.json_response({"status": "failed", "reason": "no_model_instance"},
                                 status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.ready and not state.draining and state.service.live
    reason = "ready" if ok else ("draining" if state.draining else
                                 ("failed" if state.failed else "loading"
                                  if not state.ready else "no_model_instance"))
    if ok and state.log.failing:
        # Still ready: requests are answered correctly without their log lines, and taking
        # every replica on a full log volume out of service would turn a blind spot into an
        # outage. The reason tells the operator; the counter in /status counts the loss.
        reason = "log_write_failed"
    return web.json_response({"ready": ok, "reason": reason}, status=200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    gate = state.gate.current()
    body: dict[str, Any] = {
        **state.service.snapshot(), "started_at": state.started_at, "pid": os.getpid(),
        "backend": state.backend.name, "model_version": state.backend.model_version,
        "ready": state.ready and not state.draining, "draining": state.draining,
        "version": __version__, "ingress_open": gate.open,
        "cache_entries": len(state.cache) if state.cache is not None else 0,
        "jobs_pending": state.jobs.pending, **gpu_status(state.backend)}
    body["store"] = state.store.status()
    body.update(state.admission.limits(), log_write_errors=state.log.write_errors)
    return web.json_response(body)


def build_app(config: AppConfig, backend: Backend, log: StructuredLog,
              clock: Callable[[], float] = time.monotonic) -> web.Application:
    """The aiohttp application; warm-up starts with the app, readiness follows it."""
    app = web.Application(middlewares=[observe], client_max_size=config.server.max_body_bytes)
    state = AppState(config, backend, log, clock)
    app[STATE] = state
    app.router.add_post("/v1/tts", tts)
    app.router.add_post("/v1/tts/jobs", submit_job)
    app.router.add_get("/v1/tts/jobs/{job_id}", get_job)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)

    async def start(_app: web.Application) -> None:
        log.event("service_start", pid=os.getpid(), version=__version__, backend=backend.name)
        state.warm_task = asyncio.get_running_loop().create_task(state.warm_up())

    async def stop(_app: web.Application) -> None:
        if state.service.shared is not None:
            await state.service.shared.close()
        await state.store.close()
        state.service.close()
        await asyncio.get_running_loop().run_in_executor(None, backend.close)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
