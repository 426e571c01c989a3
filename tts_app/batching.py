"""Dynamic batching in front of a backend whose model call takes several texts (ChatTTS).

:class:`BatchingBackend` is itself a backend, so the engine, admission and worker pool stay
as they are: it reports ``max_size`` times the model instances as its concurrency, so up to
``max_size`` requests per instance reach it at once, each in its own worker thread. The
first request of a compatible group (equal ``batch_key``) leads: it waits up to
``max_wait_ms`` for up to ``max_size - 1`` more, and past that for as long as every model
instance is busy (a group fills while the model works, as serving stacks' dynamic batchers
do, so a steady load settles into full batches rather than splitting into small ones). It
then runs one ``synthesize_batch`` call in its own thread and hands every other member its
chunks through that member's queue. Every member reports the call's stages as its own,
plus ``batch_wait`` (its time in the group).

A failed batch fails only what it must: members that got no audio yet run again alone
(one bad text, or a batch too big for the GPU, then fails only its own request); members
already holding audio get the error, since their audio cannot be taken back.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tts_app.backends.base import Backend, BatchBackend, StageCallback, SynthesisRequest
from tts_app.config import BatchConfig


class _End:
    """Queue marker: the member's audio is complete."""


class _Alone:
    """Queue marker: the batch failed before this member got audio; run it alone."""


_Item = np.ndarray | _End | _Alone | BaseException


@dataclass(eq=False)
class _Member:
    request: SynthesisRequest
    on_stage: StageCallback
    arrived: float
    inbox: queue.SimpleQueue[_Item] = field(default_factory=queue.SimpleQueue)
    delivered: bool = False


class BatchingBackend:
    """A :class:`BatchBackend` behind the plain backend protocol, batching concurrent calls."""

    def __init__(self, inner: BatchBackend, max_size: int, max_wait_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._cond = threading.Condition()
        self._open: dict[Hashable, list[_Member]] = {}
        self._calls = 0       # model calls started and not finished (guarded by _cond)
        # The size of the call each request ran in; weak so an abandoned request leaves nothing.
        self._sizes: weakref.WeakKeyDictionary[SynthesisRequest, int] = \
            weakref.WeakKeyDictionary()
        self.name = inner.name
        self.sample_rate = inner.sample_rate
        self.voices = inner.voices
        self.instances = inner.instances * max_size

    # --- the backend protocol, delegated
    @property
    def model_version(self) -> str:     # the model's changes during load()
        return self.inner.model_version

    @model_version.setter
    def model_version(self, value: str) -> None:
        self.inner.model_version = value

    def __getattr__(self, name: str) -> Any:
        # Optional backend conventions (``languages``, ``gpu_devices``, ...) read through to
        # the model; "inner" itself is only missing while the object is being built.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def load(self) -> None:
        self.inner.load()

    def close(self) -> None:
        self.inner.close()

    def batch_size_of(self, request: SynthesisRequest) -> int:
        """How many requests shared ``request``'s model call (1 before it ran)."""
        with self._cond:
            return self._sizes.get(request, 1)

    # --- batching
    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        key = self.inner.batch_key(request)
        me = _Member(request, on_stage, self._clock())
        if key is None:
            yield from self._alone(me)
            return
        with self._cond:
            group = self._open.get(key)
            if group is not None:
                group.append(me)
                if len(group) >= self.max_size:
                    del self._open[key]
                    self._cond.notify_all()
            else:
                group = self._open[key] = [me]
                deadline = self._clock() + self.max_wait_s
                while self._open.get(key) is group:
                    remaining = deadline - self._clock()
                    if remaining <= 0 and self._calls < self.inner.instances:
                        del self._open[key]
                        break
                    # past the deadline: woken when a call ends or the group fills
                    self._cond.wait(remaining if remaining > 0 else None)
            if group[0] is me:
                self._calls += 1
        if group[0] is me:
            yield from self._lead(group)
        else:
            yield from self._follow(me)

    def _alone(self, me: _Member) -> Iterator[np.ndarray]:
        with self._cond:
            self._calls += 1
        try:
            self._started([me])
            yield from self.inner.synthesize(me.request, me.on_stage)
        finally:
            self._call_ended()

    def _call_ended(self) -> None:
        with self._cond:
            self._calls -= 1
            self._cond.notify_all()

    def _started(self, members: list[_Member]) -> None:
        now = self._clock()
        with self._cond:
            for member in members:
                self._sizes[member.request] = len(members)
        for member in members:
            member.on_stage("batch_wait", (now - member.arrived) * 1000)

    def _follow(self, me: _Member) -> Iterator[np.ndarray]:
        while True:
            item = me.inbox.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Alone):
                yield from self._alone(me)
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _lead(self, members: list[_Member]) -> Iterator[np.ndarray]:
        """Run the batch; yield the leader's chunks, queue everyone else's.

        The leader's own consumer may stop early (generator closed); the call still runs to
        the end for the others. The call's stage times reach every member that keeps its
        result; a member run again alone reports that run's stages instead.
        """
        me, others = members[0], members[1:]
        self._started(members)
        listening = True
        failure: Exception | None = None
        stages: list[tuple[str, float]] = []
        try:
            requests = [member.request for member in members]
            for index, chunk in self.inner.synthesize_batch(
                    requests, lambda stage, ms: stages.append((stage, ms))):
                member = members[index]
                member.delivered = True
                if member is not me:
                    member.inbox.put(chunk)
                elif listening:
                    try:
                        yield chunk
                    except GeneratorExit:
                        listening = False
        except Exception as exc:
            failure = exc
            if listening and (len(members) == 1 or me.delivered):
                raise
        finally:
            self._call_ended()
            for member in members:
                if failure is None or len(members) == 1 or member.delivered:
                    for stage, duration_ms in stages:
                        member.on_stage(stage, duration_ms)
            for member in others:
                member.inbox.put(_End() if failure is None else
                                 failure if member.delivered else _Alone())
        if failure is not None and listening:
            yield from self._alone(me)


def with_batching(backend: Backend, config: BatchConfig) -> Backend:
    """``backend`` behind a batcher when it can batch and ``batch.max_size`` > 1."""
    if config.max_size <= 1 or not isinstance(backend, BatchBackend):
        return backend
    return BatchingBackend(backend, config.max_size, config.max_wait_ms / 1000)


def batch_size_of(backend: Backend, request: SynthesisRequest) -> int:
    """The ``batch_size`` logged on a synthesis: 1 for a backend that does not batch."""
    return backend.batch_size_of(request) if isinstance(backend, BatchingBackend) else 1
