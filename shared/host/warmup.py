"""When a picker replica may start taking requests: once it has heard its engines and its peers.

A replica that takes requests at once refuses them 503 ("no endpoint serves model") until its engines' first
reports arrive, while its peers could route them; and it routes to an engine its peers leave out as broken until the
first digest of failing engines reaches it (``shared.host.outcomes``: every ``DIGEST_EVERY_S``). Both pickers wait
for this before they take any: the NATS picker before it joins its queue group, the gateway's before it opens the
listeners Envoy sends to (Envoy's other replicas serve meanwhile).
"""

from __future__ import annotations

import asyncio
from typing import Final

from shared.core.routing.state import PoolState
from shared.host.outcomes import DIGEST_EVERY_S, OUTCOMES_EVERY_S

SETTLE_S: Final = 0.3  # reports heard this long before taking requests: every engine reports within 50-200 ms
WAIT_S: Final = 3.0  # and at most this long after starting: with no engine at all, its 503s still say why
PEERS_HEARD_S: Final = DIGEST_EVERY_S + 2 * OUTCOMES_EVERY_S + 0.1  # one peer digest, sent and carried


def heard_every_engine(state: PoolState, heard_for_s: float) -> bool:
    """Every endpoint of the pool has reported, and reports have been coming in for ``heard_for_s``."""
    endpoints = state.endpoints.values()
    return heard_for_s >= SETTLE_S and bool(endpoints) and all(st.metrics is not None for st in endpoints)


async def until_warm(state: PoolState) -> None:
    """Return once every endpoint has reported (settled ``SETTLE_S`` from the first report: placement's pool lists
    endpoints before they report) and the peers have been heard for ``PEERS_HEARD_S``, or ``WAIT_S`` after the call,
    whatever was heard. Call it once subscribed to the engines' reports and the peers' outcomes."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    first_heard: float | None = None
    while (now := loop.time()) - start < WAIT_S:
        if first_heard is None and any(st.metrics is not None for st in state.endpoints.values()):
            first_heard = now
        if first_heard is not None and now - start >= PEERS_HEARD_S and heard_every_engine(state, now - first_heard):
            return
        await asyncio.sleep(0.02)
