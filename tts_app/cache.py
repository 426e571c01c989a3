"""Size-capped LRU disk cache of finished audio, with a small in-memory layer for hot entries.

Production traffic repeats texts (docs/benchmarks.md, "Comment figures"), so a hit must be
cheap: the memory layer answers without touching the disk, the disk layer costs one small file
read.
Writes are atomic (temporary file + rename) so a crash never leaves a torn entry; a body
that is not stored (larger than the whole cache, or a write error such as ENOSPC, read-only,
missing directory) is reported to the caller with its reason, never raised, because a cache
that cannot write must not fail the request that produced the audio.
All methods run on the event loop thread; entries are small, so their I/O is brief.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tts_app.backends.base import SynthesisParams
from tts_app.files import write_atomically

SUFFIX = ".audio"


@dataclass(frozen=True, slots=True)
class NotSaved:
    """Why :meth:`DiskCache.put` stored nothing on disk."""

    reason: str                       # "too_large" | "write_failed"
    error: OSError | None = None


def cache_key(backend: str, model_version: str, voice: str, lang: str, text: str,
              params: SynthesisParams, fmt: str) -> str:
    """Stable hex key of everything that changes the audio bytes."""
    material = json.dumps([backend, model_version, voice, lang, text, params.seed,
                           params.temperature, params.top_p, params.top_k, params.speed, fmt],
                          ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


class DiskCache:
    """``get``/``put`` of response bodies by key; evicts least recently used beyond max_bytes."""

    def __init__(self, directory: str | Path, max_bytes: int, memory_max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.memory_max_bytes = memory_max_bytes
        self._index: OrderedDict[str, int] = OrderedDict()    # key -> size, LRU order
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = 0
        self.total_bytes = 0
        self.evictions = 0
        self._scan()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / (key + SUFFIX)

    def _scan(self) -> None:
        """Rebuild the index from disk, oldest access first, so a restart keeps the cache."""
        found: list[tuple[float, str, int]] = []
        try:
            for path in self.directory.glob(f"*/*{SUFFIX}"):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                found.append((stat.st_mtime, path.name[: -len(SUFFIX)], stat.st_size))
        except OSError:
            return
        for _, key, size in sorted(found):
            self._index[key] = size
            self.total_bytes += size
        self._evict()

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> bytes | None:
        body = self._memory.get(key)
        if body is not None:
            self._memory.move_to_end(key)
            if key in self._index:     # absent when the disk write failed
                self._index.move_to_end(key)
            return body
        if key not in self._index:
            return None
        try:
            body = self._path(key).read_bytes()
        except OSError:
            self._drop(key)
            return None
        self._index.move_to_end(key)
        self._remember(key, body)
        return body

    def put(self, key: str, body: bytes) -> NotSaved | None:
        """Store ``body``; None when it is on disk, else why not (never raises)."""
        self._remember(key, body)
        if len(body) > self.max_bytes:
            return NotSaved("too_large")
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, body)
        except OSError as exc:
            return NotSaved("write_failed", exc)
        self.total_bytes += len(body) - self._index.pop(key, 0)
        self._index[key] = len(body)
        self._evict()
        return None

    def _remember(self, key: str, body: bytes) -> None:
        if len(body) > self.memory_max_bytes // 4:
            return
        old = self._memory.pop(key, None)
        self._memory_bytes += len(body) - (len(old) if old is not None else 0)
        self._memory[key] = body
        while self._memory_bytes > self.memory_max_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_bytes -= len(dropped)

    def _drop(self, key: str) -> None:
        self.total_bytes -= self._index.pop(key, 0)
        body = self._memory.pop(key, None)
        if body is not None:
            self._memory_bytes -= len(body)

    def _evict(self) -> None:
        while self.total_bytes > self.max_bytes and self._index:
            key = next(iter(self._index))
            self._drop(key)
            self.evictions += 1
            with contextlib.suppress(OSError):
                self._path(key).unlink(missing_ok=True)
