"""Jobs and Idempotency-Keys shared between replicas.

A job is a JSON record (``job:<id>``: status, error, timestamps, format) plus, once done, its
audio (``job:<id>:audio``; the record's ``audio`` says it was written), both expiring after
the jobs' TTL. A key is
taken with ``SET NX`` on ``idem:<sha256(client, key)>`` holding the job id and the request's
digest: whichever replica a retry reaches, the same body finds the same job and another body
is 409. The record is written before the key is taken, so a replica that finds the key always
finds its job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tts_app.errors import AppError
from tts_app.store.audio import plausible_audio
from tts_app.store.base import Store

STATUSES = frozenset(("queued", "running", "done", "failed"))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class RemoteJob:
    """A job another replica runs, as its record says."""

    id: str
    status: str
    format: str
    record: dict[str, Any]
    body: bytes | None = None

    def describe(self) -> dict[str, Any]:
        return dict(self.record)


def _problem(record: Any, job_id: str) -> str | None:
    """Why ``record`` is not a job record this app wrote for ``job_id``, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("id") != job_id or record.get("status") not in STATUSES:
        return "id or status missing or wrong"
    if record.get("format") not in ("wav", "pcm") or not isinstance(record.get("describe"),
                                                                     dict):
        return "format or description missing"
    return None


class SharedJobs:
    def __init__(self, store: Store, ttl_s: float) -> None:
        self._store = store
        self.ttl_s = ttl_s

    async def save(self, job_id: str, fmt: str, describe: dict[str, Any],
                   body: bytes | None = None) -> None:
        record: dict[str, Any] = {"id": job_id, "status": describe["status"], "format": fmt,
                                  "describe": describe}
        if body is not None:
            record["audio"] = await self._store.put(f"job:{job_id}:audio", body, self.ttl_s)
        await self._store.put(f"job:{job_id}", json.dumps(record).encode(), self.ttl_s)

    async def claim(self, client: str, key: str, job_id: str, canonical: str) -> str | None:
        """Take ``key`` for ``job_id`` (saved first). None: ours (or the store is down, and
        the key holds on this replica only); else the id of the job that already has it.
        Raises IDEMPOTENCY_CONFLICT when the key was taken for another request body."""
        name = "idem:" + _digest(client, key)
        mine = json.dumps({"job": job_id, "body": _digest(canonical)}).encode()
        if await self._store.put(name, mine, self.ttl_s, only_new=True):
            return None
        raw = await self._store.get(name)
        if raw is None:
            return None
        try:
            held = json.loads(raw)
            other, digest = held["job"], held["body"]
            if not isinstance(other, str) or not isinstance(digest, str):
                raise TypeError("job or body is not a string")
        except (ValueError, TypeError, KeyError) as exc:
            self._store.count_bad_value(name, f"not an idempotency record ({exc})")
            await self._store.put(name, mine, self.ttl_s)
            return None
        await self._store.delete(f"job:{job_id}")     # never to run: its record goes
        if digest != _digest(canonical):
            raise AppError("IDEMPOTENCY_CONFLICT")
        return other

    async def load(self, job_id: str) -> RemoteJob | None:
        raw = await self._store.get(f"job:{job_id}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        problem = _problem(record, job_id)
        if problem is not None:
            self._store.count_bad_value(f"job:{job_id}", problem)
            return None
        body = None
        if record["status"] == "done" and record.get("audio") is True:
            body = await self._store.get(f"job:{job_id}:audio")
            problem = None if body is None else plausible_audio(body, record["format"])
            if problem is not None:
                self._store.count_bad_value(f"job:{job_id}:audio", problem)
                body = None
        return RemoteJob(job_id, record["status"], record["format"], record["describe"], body)
