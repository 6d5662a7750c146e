"""Engine failures shared between picker replicas: the gateway's (``subjects.GATEWAY_OUTCOMES``) and the NATS
picker's (``subjects.PICKER_OUTCOMES``), each on its own subject.

Each replica learns that an engine fails from the requests it placed there itself. With N replicas (behind one
Envoy, or in one NATS queue group), an engine that fails every request would so take ``BROKEN_STREAK`` failures at
each of them before every replica left it out, and a replica that never sent there would still count it idle. So
each replica tells the others what it saw (every failure, and the first success after failures) and counts what they
tell it as its own; every ``DIGEST_EVERY_S`` it also names the engines it counts as failing now, so a replica that
starts later (or lost a message) leaves out what the others leave out, without anyone's hold being renewed by the
telling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator

from nats.aio.msg import Msg
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.bus.messages import EndpointOutcome, EndpointOutcomes, FailingEndpoint
from shared.bus.runtime import Bus
from shared.core.routing.domain import FAILED_HOLD_S
from shared.core.routing.state import PoolState

log = logging.getLogger(__name__)

OUTCOMES_EVERY_S = 0.05
"""How often a replica sends what it saw (when it saw anything): the staleness bound of a peer's failure, beside
a NATS hop; a cold prompt placed meanwhile may still go to the engine."""
DIGEST_EVERY_S = 1.0
"""How often a replica names the engines it counts as failing (only when there are some)."""
MAX_LATE_S = 2.0
"""A message sent longer ago than this by the receiver's clock (or dated that far ahead: clocks apart) is dropped:
NATS buffers what a disconnected client publishes and delivers it on reconnect, and minutes-old failures must not
start a new hold at the peers. Clocks of the replicas' hosts must agree within it (NTP does by far)."""
KNOWN_REPLICAS = 256
"""Replicas whose last message number is remembered (for dropping duplicates); past it the least recent goes."""
LOG_EVERY_S = 10.0


class OutcomeShare:
    """This replica's engine failures out to the other replicas, theirs into its pool state."""

    def __init__(self, state: PoolState, subject: str, clock: Callable[[], float] = time.time,
                 replica: str | None = None) -> None:
        self.state = state
        self.subject = subject  # where the replicas of one picker service tell each other
        self._news = asyncio.Event()  # set when this replica kept an outcome: the sender wakes for it
        state.share_outcomes(self._news.set)
        self.failing_until = 0.0  # (this replica's clock) an engine may count as failing until then: digests due
        self.clock = clock
        self.replica = replica or uuid.uuid4().hex
        self._seq = 0
        self._last: OrderedDict[str, int] = OrderedDict()  # replica -> the last message number taken from it
        self.applied = 0  # peers' outcomes counted here
        self.duplicates = 0  # messages dropped as already taken
        self.late = 0  # messages dropped as sent too long ago
        self.unsent = 0  # messages dropped while NATS was away
        self._logged = -LOG_EVERY_S

    def outgoing(self, digest: bool = False) -> EndpointOutcomes | None:
        """What this replica saw since the last call, as one message, with (``digest``) the engines it counts as
        failing now (None: nothing to tell)."""
        now = self.clock()
        news = self.state.take_outcomes()
        if any(failed for _, failed in news):
            self.failing_until = now + FAILED_HOLD_S
        failing = self.state.failing_digest(now) if digest else []
        if not news and not failing:
            return None
        msg = EndpointOutcomes(replica=self.replica, seq=self._seq, sent_at=now,
                               outcomes=[EndpointOutcome(endpoint=e, failed=f) for e, f in news],
                               failing=[FailingEndpoint(endpoint=e, streak=k, age_s=a) for e, k, a in failing])
        self._seq += 1
        return msg

    def take(self, msg: EndpointOutcomes) -> int:
        """Count a peer's outcomes as this replica's own and take its digest where it says more; returns how many
        applied (0 for this replica's own message, a duplicate or an older one, one delivered late, and for engines
        this replica does not know)."""
        if msg.replica == self.replica:
            return 0
        now = self.clock()
        if abs(now - msg.sent_at) > MAX_LATE_S:
            self.late += 1
            return 0
        last = self._last.get(msg.replica)
        if last is not None and msg.seq <= last:
            self.duplicates += 1
            return 0
        self._last[msg.replica] = msg.seq
        self._last.move_to_end(msg.replica)
        while len(self._last) > KNOWN_REPLICAS:
            self._last.popitem(last=False)
        state = self.state
        n = sum(state.peer_outcome(o.endpoint, o.failed, now, msg.sent_at) for o in msg.outcomes)
        n += sum(state.peer_failing(f.endpoint, f.streak, f.age_s, now) for f in msg.failing)
        if n:  # it may count engines as failing now: its own digests are due until their hold ends
            self.failing_until = max(self.failing_until, now + FAILED_HOLD_S)
        self.applied += n
        return n

    async def on_message(self, bus: Bus, msg: Msg) -> None:
        """A peer's message off the bus (an undecodable one goes to the dead letters)."""
        got = await bus.decode_or_reject(msg.subject, msg.data, EndpointOutcomes)
        if got is not None:
            self.take(got)

    async def send_forever(self, bus: Bus) -> None:
        """Send what this replica saw, ``OUTCOMES_EVERY_S`` after it saw it (what comes meanwhile goes along), and
        every ``DIGEST_EVERY_S`` while an engine may count as failing, the engines it counts as failing; asleep
        otherwise (no polling). While NATS is away nothing is sent (the client would buffer it and deliver it late)
        and the news is dropped; a send that fails is logged (at most every ``LOG_EVERY_S``) and dropped too: the
        peers learn of the next failure, and of a broken engine from the next digest."""
        next_digest = 0.0
        while True:
            wait = None if self.clock() >= self.failing_until else max(next_digest - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), wait)
            self._news.clear()
            await asyncio.sleep(OUTCOMES_EVERY_S)
            now = time.monotonic()
            digest = now >= next_digest and self.clock() < self.failing_until
            if digest:
                next_digest = now + DIGEST_EVERY_S
            msg = self.outgoing(digest)
            if msg is None:
                continue
            if not bus.nc.is_connected:
                self.unsent += 1
                continue
            try:
                await bus.publish(self.subject, msg)
            except Exception as err:  # NATS gone or reconnecting: the picker keeps deciding
                if now - self._logged >= LOG_EVERY_S:
                    self._logged = now
                    log.warning("cannot tell the other picker replicas of %d engine outcomes: %s",
                                len(msg.outcomes), err)


PEER_OUTCOMES = "gantry_peer_outcomes"
"""Exposed as ``gantry_peer_outcomes_total{service, result}``: the other replicas' engine outcomes counted here
(``applied``), their messages dropped as already taken (``duplicate``) or sent too long ago (``late``), and this
replica's own messages not sent while NATS was away (``unsent``)."""


class PeerOutcomeMetrics(Collector):
    """``share``'s counts as one counter family, read when scraped (the sharing itself pays nothing for it)."""

    def __init__(self, service: str, share: OutcomeShare) -> None:
        self.service = service
        self.share = share

    def collect(self) -> Iterator[Metric]:
        """The counter family, read off the share now."""
        family = CounterMetricFamily(
            PEER_OUTCOMES, "Engine failures and recoveries told between picker replicas: outcomes counted from the "
            "others, messages dropped as duplicates or as late, own messages not sent while NATS was away",
            labels=["service", "result"])
        s = self.share
        for result, count in (("applied", s.applied), ("duplicate", s.duplicates), ("late", s.late),
                              ("unsent", s.unsent)):
            family.add_metric([self.service, result], count)
        yield family
