"""A daemon thread that runs blocking calls one at a time for the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonWorker:
    """Runs blocking calls one at a time on a daemon thread, handing results to the event loop.

    Not a ThreadPoolExecutor: its workers are joined at interpreter exit, so one read wedged in
    the driver would keep the sidecar from ever exiting on SIGTERM.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Any] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put((call, future))
        return future

    def close(self, last_call: Callable[[], Any] | None = None) -> None:
        """Run ``last_call`` after what is queued (result dropped), then end the thread."""
        if last_call is not None:
            self._calls.put((last_call, None))
        self._calls.put(None)

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            call, future = item
            try:
                result, error = call(), None
            except BaseException as exc:  # handed to the awaiting coroutine, not lost
                result, error = None, exc
            if future is None:
                continue
            # RuntimeError: the loop closed while the call ran, so nobody is waiting.
            with contextlib.suppress(RuntimeError):
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
