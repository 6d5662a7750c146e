"""Stopping background tasks for certain, although one ``cancel()`` may be lost.

On Python 3.11, ``asyncio.wait_for`` returns the inner result instead of raising when the cancellation arrives
in the same loop turn as the awaited operation completes (fixed in 3.12 by rebuilding it on
``asyncio.timeout``). Client libraries call it on their hot paths (redis-py wraps every socket write in it
when a socket timeout is set), so a loop cancelled once may simply run on; whoever then awaits it waits
forever. ``cancel_until_done`` repeats the cancellation until each task has ended or the bound has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Iterable
from typing import Any

RECANCEL_S = 0.5  # a task still running this long after a cancel gets another one


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]], timeout: float | None = None,
                            every: float = RECANCEL_S) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and keep cancelling those still running every ``every`` seconds until all have ended
    or ``timeout`` (None: no bound) has passed; returns the tasks still running (empty when all ended).

    The interval leaves a task that honours its cancellation time to finish its cleanup undisturbed.
    """
    if not every > 0:
        raise ValueError(f"the re-cancel interval must be > 0 s (got {every})")
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        wait = every if deadline is None else min(every, deadline - loop.time())
        if wait <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=wait)
    return pending


async def run_until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` until it ends or SIGTERM/SIGINT arrives; a signal cancels it, so its ``finally`` blocks
    (a server's grace period, closing files) run before the process exits 0, as an orchestrator's stop expects."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
