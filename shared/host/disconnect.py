"""Closing a NATS connection within a bound, whether its server answers, is gone or has stopped answering.

nats-py's ``drain()`` waits up to 10 s for each round trip it makes (the subscriptions' one, then the publishes'),
and a round trip begun just before a reset it has not read yet never ends before that: a service told to stop as
NATS died took 10 s to exit, 20 s when NATS stopped answering (its host or network gone). Once the client has seen
the reset, ``drain()`` raises instead, and ``close()`` can raise part-way (publishes still pending on a closed
socket): the service then exited 1 with a traceback. A service stopping on SIGTERM must exit within ~2 s, so that
Kubernetes, ``gantry up`` and a rolling upgrade never wait on it.

``close_promptly`` keeps the drain where it can help, on a connection that may still reach its server: the
subscriptions stop taking messages and hand over those already delivered, and every ack and publish made before
reaches the server. Past ``DRAIN_S`` the server is taken for gone and the connection is closed (``CLOSE_S``). What
is lost then was never acknowledged: JetStream redelivers it after the ack wait, and core-NATS commands are repaired
by the level-triggered resync, as after a kill.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from shared.host.tasks import cancel_until_done

if TYPE_CHECKING:  # no import for the engine servers and the picker: FastStream's cost ~0.1 s at start-up
    from nats.aio.client import Client

log = logging.getLogger("gantry.disconnect")

DRAIN_S = 1.0
"""Longest a drain may take. A server that answers drains a connection in milliseconds."""
CLOSE_S = 0.5
"""Longest a close may take (it waits on nothing remote; nats-py may wait up to 2 s on its reconnection task)."""
RECANCEL_S = 0.05
"""nats-py's drain takes its first cancellation as the end of its subscription phase and goes on to a 10 s round
trip: it is cancelled again this soon."""


async def close_promptly(nc: Client, drain_s: float = DRAIN_S, close_s: float = CLOSE_S) -> bool:
    """Drain ``nc`` if it is connected, within ``drain_s``; close it if that did not, within ``close_s``. Never
    raises (the process is on its way out); True when the drain completed, everything sent having reached the
    server."""
    drained = False
    if nc.is_connected:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        # One round trip of our own first: it is cut short cleanly, where a drain cut short in its round trips
        # leaves nats-py's futures failing unobserved (logged as errors). A server that answers it drains.
        if await _within("flush", nc.flush(), drain_s):
            drained = await _within("drain", nc.drain(), max(0.0, deadline - loop.time()))
        if not drained:
            log.warning("NATS did not take the drain within %.1f s: closing without it (what was not acknowledged "
                        "is redelivered)", drain_s)
    if not nc.is_closed:
        await _within("close", nc.close(), close_s)
    return drained


async def _within(what: str, step: Coroutine[Any, Any, None], bound: float) -> bool:
    """Run ``step`` (``what``: its name for the log) for at most ``bound`` seconds, then cancel it for certain;
    True if it ended without error."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=bound)
    if not done:
        stuck = await cancel_until_done({task}, timeout=bound, every=RECANCEL_S)
        if stuck:  # left to the event loop's end, which cancels what is left
            log.warning("NATS %s ignored its cancellation", what)
        return False
    if task.cancelled():
        return False
    err = task.exception()
    if err is not None:  # NATS reset or reconnecting: nothing more can reach it
        log.info("NATS %s failed at shutdown: %r", what, err)
        return False
    return True

