"""Engine failures shared between gateway replicas (``subjects.GATEWAY_OUTCOMES``).

Each replica learns that an engine fails from the requests it placed there itself. With N replicas behind one
Envoy, an engine that fails every request would so take ``BROKEN_STREAK`` failures at each of them before every
replica left it out, and a replica that never sent there would still count it idle. So each replica tells the
others what it saw (every failure, and the first success after failures) and counts what they tell it as its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from nats.aio.msg import Msg

from shared.bus import subjects
from shared.bus.messages import EndpointOutcome, EndpointOutcomes
from shared.bus.runtime import Bus
from shared.core.routing.state import PoolState

log = logging.getLogger(__name__)

OUTCOMES_EVERY_S = 0.05
"""How often a replica sends what it saw (when it saw anything): the staleness bound of a peer's failure, beside
a NATS hop; a cold prompt placed meanwhile may still go to the engine."""
KNOWN_REPLICAS = 256
"""Replicas whose last message number is remembered (for dropping duplicates); past it the least recent goes."""
LOG_EVERY_S = 10.0


class OutcomeShare:
    """This replica's engine failures out to the other replicas, theirs into its pool state."""

    def __init__(self, state: PoolState, clock: Callable[[], float] = time.time, replica: str | None = None) -> None:
        self.state = state
        state.share_outcomes()
        self.clock = clock
        self.replica = replica or uuid.uuid4().hex
        self._seq = 0
        self._last: OrderedDict[str, int] = OrderedDict()  # replica -> the last message number taken from it
        self.applied = 0  # peers' outcomes counted here
        self.duplicates = 0  # messages dropped as already taken
        self._logged = -LOG_EVERY_S

    def outgoing(self) -> EndpointOutcomes | None:
        """What this replica saw since the last call, as one message (None: nothing)."""
        news = self.state.take_outcomes()
        if not news:
            return None
        msg = EndpointOutcomes(replica=self.replica, seq=self._seq,
                               outcomes=[EndpointOutcome(endpoint=e, failed=f) for e, f in news])
        self._seq += 1
        return msg

    def take(self, msg: EndpointOutcomes) -> int:
        """Count a peer's outcomes as this replica's own; returns how many applied (0 for this replica's own
        message, a duplicate or an older one, and for engines this replica does not know)."""
        if msg.replica == self.replica:
            return 0
        last = self._last.get(msg.replica)
        if last is not None and msg.seq <= last:
            self.duplicates += 1
            return 0
        self._last[msg.replica] = msg.seq
        self._last.move_to_end(msg.replica)
        while len(self._last) > KNOWN_REPLICAS:
            self._last.popitem(last=False)
        now = self.clock()
        n = sum(self.state.peer_outcome(o.endpoint, o.failed, now) for o in msg.outcomes)
        self.applied += n
        return n

    async def on_message(self, bus: Bus, msg: Msg) -> None:
        """A peer's message off the bus (an undecodable one goes to the dead letters)."""
        got = await bus.decode_or_reject(msg.subject, msg.data, EndpointOutcomes)
        if got is not None:
            self.take(got)

    async def send_forever(self, bus: Bus) -> None:
        """Every ``OUTCOMES_EVERY_S``, send what this replica saw, if anything. A send that fails is logged (at most
        every ``LOG_EVERY_S``) and its outcomes dropped: the peers learn of the next failure instead."""
        while True:
            await asyncio.sleep(OUTCOMES_EVERY_S)
            msg = self.outgoing()
            if msg is None:
                continue
            try:
                await bus.publish(subjects.GATEWAY_OUTCOMES, msg)
            except Exception as err:  # NATS gone or reconnecting: the picker keeps deciding
                now = time.monotonic()
                if now - self._logged >= LOG_EVERY_S:
                    self._logged = now
                    log.warning("cannot tell the other picker replicas of %d engine outcomes: %s",
                                len(msg.outcomes), err)
