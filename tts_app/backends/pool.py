"""The model instances of a backend, and what happens to one whose synthesis hangs.

Both backends keep ``instances`` loaded copies of their model and lend each to one request at
a time (neither ChatTTS's Chat nor libespeak-ng is safe for concurrent use).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from tts_app.backends.base import SynthesisRequest

T = TypeVar("T")


class InstancePool(Generic[T]):
    """A backend's loaded model instances, lent to one synthesis at a time.

    A synthesis that outlives its time limit cannot be stopped (a thread cannot be killed),
    so the app *retires* the instance it holds: whenever that call finally returns, the
    instance is handed to ``discard`` (unloaded) instead of going back into service, and a
    replacement is loaded with :meth:`put`. Thread-safe: checkouts run in worker threads.
    """

    def __init__(self, discard: Callable[[T], None]) -> None:
        self._discard = discard
        self._idle: queue.Queue[T] = queue.Queue()
        # id(request) -> its instance: X-Request-ID comes from clients and need not be unique
        self._busy: dict[int, T] = {}
        self._retired: set[int] = set()    # id() of busy instances that must not return
        self._lock = threading.Lock()

    def put(self, instance: T) -> None:
        """Put a loaded instance into service."""
        self._idle.put(instance)

    @contextmanager
    def checkout(self, request: SynthesisRequest) -> Iterator[T]:
        instance = self._idle.get()
        with self._lock:
            self._busy[id(request)] = instance
        try:
            yield instance
        finally:
            with self._lock:
                self._busy.pop(id(request), None)
                retired = id(instance) in self._retired
                self._retired.discard(id(instance))
            if retired:
                self._discard(instance)
            else:
                self._idle.put(instance)

    def retire(self, request: SynthesisRequest) -> bool:
        """Take the instance ``request`` holds out of service; False if it holds none."""
        with self._lock:
            instance = self._busy.get(id(request))
            if instance is None:
                return False
            self._retired.add(id(instance))
            return True

    def close(self) -> None:
        """Discard every idle instance (busy ones are discarded when they return)."""
        with self._lock:
            self._retired.update(id(instance) for instance in self._busy.values())
        while True:
            try:
                self._discard(self._idle.get_nowait())
            except queue.Empty:
                return
