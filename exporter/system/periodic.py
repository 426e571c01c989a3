"""The one periodic loop the system collectors share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def every(interval_s: float, call: Callable[[], Awaitable[None]], started: float) -> None:
    """Await ``call`` every ``interval_s``, counted from the start of the previous call, until
    cancelled. ``started`` is the loop time of the call the caller made itself (the first one,
    made before the HTTP server listens, so the first answer is informed)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(max(0.0, interval_s - (loop.time() - started)))
        started = loop.time()
        await call()
