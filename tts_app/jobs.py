"""Asynchronous synthesis jobs with Idempotency-Key semantics.

A client that times out and retries must not pay for a second synthesis: the same key with the
same request returns the same job; the same key with a different request is a client bug and
gets 409. A key is scoped to the client identity (:mod:`tts_app.identity`): another client's
same key is another job, never a replay of someone else's audio. Finished jobs are kept for
``ttl_s`` (and at most ``max_kept`` jobs and ``max_bytes`` of audio, oldest forgotten first, so
a burst of long texts cannot exhaust memory) so the audio can be fetched later.
With a shared store (:mod:`tts_app.store.jobs`) jobs and keys are also visible to, and
honoured by, every other replica; the job still runs on the replica that took it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tts_app.errors import AppError
from tts_app.store.jobs import RemoteJob, SharedJobs
from tts_app.validation import TtsSpec

Clock = Callable[[], float]
MAX_KEY_CHARS = 255


def idempotency_key(raw: str | None) -> str | None:
    """The Idempotency-Key header's value, or BAD_REQUEST: present means 1-255 printable
    ASCII characters (an empty key would be one key shared by every careless client)."""
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_KEY_CHARS or not (raw.isascii() and raw.isprintable()):
        raise AppError("BAD_REQUEST", f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable "
                                      "ASCII characters")
    return raw


def _is_job_id(text: str) -> bool:
    """A shape this module's ids have (uuid4 hex): anything else is no key to look up."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


@dataclass(eq=False)
class Job:
    id: str
    spec: TtsSpec
    request_id: str
    created: float
    status: str = "queued"        # queued | running | done | failed
    body: bytes | None = None
    error: AppError | None = None
    finished: float | None = None
    idempotency_key: tuple[str, str] | None = None     # (client identity, key)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def format(self) -> str:
        return self.spec.format

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status, "created": self.created,
                               "request_id": self.request_id}
        if self.finished is not None:
            out["finished"] = self.finished
        if self.error is not None:
            out["error"] = {"code": self.error.code, "message": self.error.message}
        if self.body is not None:
            out["audio_bytes"] = len(self.body)
        return out


class JobStore:
    def __init__(self, render: Callable[[TtsSpec, str], Awaitable[bytes]], max_pending: int,
                 max_kept: int, ttl_s: float, retry_after_s: int, max_bytes: int = 256 << 20,
                 clock: Clock = time.time) -> None:
        self._render = render
        self.max_pending, self.max_kept, self.ttl_s = max_pending, max_kept, ttl_s
        self.max_bytes = max_bytes
        self.body_bytes = 0
        self.retry_after_s = retry_after_s
        self._clock = clock
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._by_key: dict[tuple[str, str], str] = {}
        self.shared: SharedJobs | None = None    # set when jobs are shared between replicas

    @property
    def pending(self) -> int:
        return sum(1 for job in self.jobs.values() if job.status in ("queued", "running"))

    async def submit(self, spec: TtsSpec, request_id: str, client: str,
                     key: str | None) -> tuple[Job | RemoteJob, bool]:
        """Return (job, created). Raises IDEMPOTENCY_CONFLICT or QUEUE_FULL."""
        self._expire()
        idempotency_key = None if key is None else (client, key)
        if idempotency_key is not None:
            job_id = self._by_key.get(idempotency_key)
            existing = self.jobs.get(job_id) if job_id else None
            if existing is not None:
                if existing.spec.canonical != spec.canonical:
                    raise AppError("IDEMPOTENCY_CONFLICT")
                return existing, False
        if self.pending >= self.max_pending:
            raise AppError("QUEUE_FULL", "too many pending jobs", self.retry_after_s)
        job = Job(uuid.uuid4().hex, spec, request_id, self._clock(),
                  idempotency_key=idempotency_key)
        if self.shared is not None:
            await self.shared.save(job.id, spec.format, job.describe())
            other = None if key is None else await self.shared.claim(client, key, job.id,
                                                                     spec.canonical)
            if other is not None:
                remote = self.jobs.get(other) or await self.shared.load(other)
                if remote is not None:
                    return remote, False
        self.jobs[job.id] = job
        if idempotency_key is not None:
            self._by_key[idempotency_key] = job.id
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return job, True

    async def get(self, job_id: str) -> Job | RemoteJob:
        self._expire()
        job: Job | RemoteJob | None = self.jobs.get(job_id)
        if job is None and self.shared is not None and _is_job_id(job_id):
            job = await self.shared.load(job_id)
        if job is None:
            raise AppError("JOB_NOT_FOUND", f"no job with id {job_id!r}")
        return job

    async def _run(self, job: Job) -> None:
        job.status = "running"
        if self.shared is not None:
            await self.shared.save(job.id, job.format, job.describe())
        try:
            job.body = await self._render(job.spec, job.request_id)
            job.status = "done"
            self.body_bytes += len(job.body)
        except AppError as exc:
            job.error, job.status = exc, "failed"
        finally:
            job.finished = self._clock()
            self._expire()
        if self.shared is not None:
            await self.shared.save(job.id, job.format, job.describe(), job.body)

    async def drain(self, timeout_s: float) -> None:
        tasks = [job.task for job in self.jobs.values() if job.task and not job.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def _expire(self) -> None:
        now = self._clock()
        while self.jobs:
            oldest = next(iter(self.jobs.values()))
            finished = oldest.finished is not None
            # the newest job survives the byte cap: its client has not fetched it yet
            over = len(self.jobs) > self.max_kept or (
                self.body_bytes > self.max_bytes and len(self.jobs) > 1)
            if not finished or not (over or now - oldest.created > self.ttl_s):
                break
            self.jobs.popitem(last=False)
            self.body_bytes -= len(oldest.body or b"")
            if oldest.idempotency_key is not None:
                self._by_key.pop(oldest.idempotency_key, None)
