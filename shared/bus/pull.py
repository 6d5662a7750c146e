"""A JetStream durable pull consumer kept fed by one open pull request (straight on nats-py).

nats-py's ``fetch`` is not used: its lingering request can keep a message that arrived in the client waiting for
later ones, which put tens of milliseconds on every hop at light load. Here one pull request for up to ``batch``
messages stays open on the server; messages are handed on as soon as they arrive, together with whatever else
arrived meanwhile (batches fill up under load, a lone message is never held back), and a new request goes out
as soon as the open one is used up, expires, or was forgotten by a server we reconnected to.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js import JetStreamContext

log = logging.getLogger("gantry.bus")

PullHandler = Callable[[list[Msg]], Awaitable[None]]

JS_API = "$JS.API"
PULL_EXPIRES_S = 5.0  # an open pull request lasts this long; an idle loop asks again after it
PULL_IDLE_CHECK_S = 0.5  # how often an idle loop checks that its request is still outstanding
UNAVAILABLE_PAUSE_S = 0.5  # JetStream answered 503 (not ready): ask again after this
ENDED = ("408", "409")  # the open request expired, or the server closed it
UNAVAILABLE = "503"
# 409s that come back on every request (the consumer was changed or deleted under the loop): asked again at once they
# spun at ~2,500 requests a second, handling nothing; re-asked after a growing pause instead, and said (as an error)
PERSISTENT_409 = ("Exceeded MaxRequestBatch", "Exceeded MaxRequestExpires", "Exceeded MaxRequestMaxBytes",
                  "Exceeded MaxWaiting", "Consumer is push based", "Consumer Deleted")
REFUSED_PAUSE_S = (0.5, PULL_EXPIRES_S)  # the first pause after such a 409, and the longest
REFUSED_LOG_EVERY_S = 60.0


class Arrivals(asyncio.Queue[Msg]):
    """What the open pull request delivered and the loop has not handed on yet, in arrival order; it can be read in
    place (``waiting``), as the keeper of a long batch does (``PullConsumer.keep_every``)."""

    _queue: collections.deque[Msg]  # the store asyncio.Queue keeps its items in (its subclasses' hook, ``_init``)

    def waiting(self) -> list[Msg]:
        """The messages waiting, oldest first (a copy: the queue may change while the caller awaits)."""
        return list(self._queue)


class PullConsumer:
    """One durable pull consumer's loop (see ``pull_loop``); its state is the open request's and the recent
    batches' (for the linger)."""

    def __init__(self, nc: Client, stream: str, durable: str, subject: str, batch: int, handler: PullHandler,
                 linger: float = 0.0, keep_every: float = 0.0) -> None:
        self.nc = nc
        self.next_subject = f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.subject = subject  # the consumer's filter, for logs
        self.batch = batch
        self.handler = handler
        self.linger = linger
        self.keep_every = keep_every  # > 0: while a batch is handled, the arrivals behind it are kept in progress
        self._keeper: asyncio.Task[None] | None = None  # keeping them, once a batch outlasted keep_every
        self.inbox = nc.new_inbox()
        self.arrived = Arrivals()
        self.left = 0  # messages the open request may still deliver
        self.asked_at = float("-inf")
        self.reconnects = nc.stats["reconnects"]
        self.unavailable = False  # a 503 came since the last request went out
        self.refusal = ""  # a persistent 409's description, since the last request went out
        self.pause = REFUSED_PAUSE_S[0]  # before the next request after such a 409 (doubling up to the longest)
        self.said: dict[str, float] = {}  # refusal -> when last logged
        self.last_start = self.prev_start = float("-inf")  # when the last two batches started
        self.last_size = 0

    async def run(self) -> None:
        """Consume forever; on the way out (cancelled), hand back what arrived but was not handled."""
        sub = await self.nc.subscribe(self.inbox, cb=self._arrived)
        try:
            await self.ask()
            while True:
                if msgs := await self.next_batch():
                    await self._handle(msgs)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await self._hand_back()

    async def _arrived(self, msg: Msg) -> None:
        self.arrived.put_nowait(msg)

    async def ask(self) -> None:
        """Open a pull request for a full batch (a failed publish leaves none open: the idle check asks again)."""
        req = {"batch": self.batch, "expires": int(PULL_EXPIRES_S * 1e9)}
        self.reconnects = self.nc.stats["reconnects"]
        self.unavailable = False
        try:
            await self.nc.publish(self.next_subject, msgspec.json.encode(req), reply=self.inbox)
        except Exception as exc:  # NATS away, draining, buffer full
            log.warning("pull request for %s not sent: %s", self.subject, exc)
            self.left = 0
            return
        self.left, self.asked_at = self.batch, time.monotonic()

    def lost(self) -> bool:
        """No request outstanding: used up or ended, a reconnect (the server forgot it), or neither messages nor
        the expiry notice for longer than a request lives."""
        stale = time.monotonic() - self.asked_at > PULL_EXPIRES_S + 1.0
        return self.left <= 0 or stale or self.nc.stats["reconnects"] != self.reconnects

    def take(self, msg: Msg, into: list[Msg]) -> None:
        """Sort one arrival: a message goes ``into`` the batch; a status notice ends the open request."""
        status = JetStreamContext.is_status_msg(msg)
        if not status:
            into.append(msg)
            self.left -= 1
            self.pause = REFUSED_PAUSE_S[0]
        elif status in ENDED:
            self.left = 0
            if status == "409":
                self.refused(str((msg.headers or {}).get("Description", "")))
        elif status == UNAVAILABLE:
            self.left, self.unavailable = 0, True

    def refused(self, why: str) -> None:
        """A 409 ended the open request. A consumer allowing smaller batches than asked gets them; one changed or
        deleted in another way makes the next request wait (``renew``)."""
        if why.startswith("Exceeded MaxRequestBatch"):
            allowed = why.rsplit(" ", 1)[-1]
            if allowed.isdigit() and 0 < int(allowed) < self.batch:
                log.warning("consumer for %s takes at most %s messages a request (asked %d): asking for that",
                            self.subject, allowed, self.batch)
                self.batch = int(allowed)
                return
        if why.startswith(PERSISTENT_409):
            self.refusal = why

    def gather(self, into: list[Msg]) -> None:
        """Whatever has already arrived, up to a full batch."""
        while not self.arrived.empty() and len(into) < self.batch:
            self.take(self.arrived.get_nowait(), into)

    async def renew(self) -> None:
        """A new request when the open one is gone (after a pause if JetStream said it was not ready)."""
        if not self.lost():
            return
        if self.unavailable:
            await asyncio.sleep(UNAVAILABLE_PAUSE_S)
        if self.refusal:
            now = time.monotonic()
            if now - self.said.get(self.refusal, float("-inf")) >= REFUSED_LOG_EVERY_S:
                self.said[self.refusal] = now
                log.error("pull requests for %s refused (%s): is the consumer changed or gone? asking again every "
                          "few seconds; `python -m ops.provision` declares it as the services expect", self.subject,
                          self.refusal)
            self.refusal = ""
            await asyncio.sleep(self.pause)
            self.pause = min(2 * self.pause, REFUSED_PAUSE_S[1])
        await self.ask()

    async def next_batch(self) -> list[Msg]:
        """The next batch to handle: empty after an idle check or a batch of status notices only."""
        try:
            first = await asyncio.wait_for(self.arrived.get(), PULL_IDLE_CHECK_S)
        except TimeoutError:
            await self.renew()
            return []
        msgs: list[Msg] = []
        self.take(first, msgs)
        self.gather(msgs)
        await self.renew()
        if msgs and self.linger > 0 and len(msgs) < self.batch and self.flowing(len(msgs)):
            rest = self.linger - (time.monotonic() - self.last_start)  # at most one batch per linger period
            if rest > 0:
                await asyncio.sleep(rest)
                self.gather(msgs)
                await self.renew()
        return msgs

    def flowing(self, size: int) -> bool:
        """Messages keep coming: this batch or the last one gathered several (but the last not a full batch), or
        the last one followed the one before it within a linger period."""
        return size > 1 or 1 < self.last_size < self.batch or self.last_start - self.prev_start < self.linger

    async def _handle(self, msgs: list[Msg]) -> None:
        self.prev_start, self.last_start, self.last_size = self.last_start, time.monotonic(), len(msgs)
        # Most batches end within milliseconds: a timer, not a task per batch, until one outlasts ``keep_every``.
        timer = (asyncio.get_running_loop().call_later(self.keep_every, self._start_keeping)
                 if self.keep_every > 0 else None)
        try:
            await self.handler(msgs)
        except Exception:  # the handler's own guard failed (e.g. NATS away while nak'ing): go on
            log.exception("handler for %s failed; messages will be redelivered", self.subject)
        finally:
            if timer is not None:
                timer.cancel()
            if (keeper := self._keeper) is not None:
                self._keeper = None
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper

    def _start_keeping(self) -> None:
        self._keeper = asyncio.ensure_future(self._keep_arrivals())

    async def _keep_arrivals(self) -> None:
        """While a batch is handled, tell JetStream every ``keep_every`` that the messages delivered behind it are
        still ours. The open request keeps delivering during a batch (so they are handed on at once after it), and a
        batch may take minutes (a stage holding its outputs until a full stream has room: ``isolation.hold``): left
        alone, each of them ran out its ack wait again and again, was delivered once more each time, and once its
        deliveries were spent was dead-lettered unhandled."""
        while True:
            for msg in self.arrived.waiting():
                if not JetStreamContext.is_status_msg(msg):
                    with contextlib.suppress(Exception):  # NATS away: it is redelivered later, as before
                        await msg.in_progress()
            await asyncio.sleep(self.keep_every)

    async def _hand_back(self) -> None:
        # delivered to us but not handled: back to the stream now rather than after the ack wait
        while not self.arrived.empty():
            msg = self.arrived.get_nowait()
            if not JetStreamContext.is_status_msg(msg):
                with contextlib.suppress(Exception):
                    await msg.nak()


def in_stream_order(msgs: list[Msg]) -> list[Msg]:
    """A pulled batch sorted by stream sequence (stable: two deliveries of one message keep their order).

    A batch comes in arrival order, which is not the stream's: a message whose ack wait ran out (its consumer died
    holding it, or took too long) is delivered again behind newer messages already on their way, so a handler to
    which the newest word must win sorts first. A batch with a message that did not come from JetStream (no
    sequence) is returned as it came."""
    try:
        return sorted(msgs, key=lambda m: m.metadata.sequence.stream)
    except NotJSMessageError:
        return list(msgs)


async def pull_loop(
    nc: Client, stream: str, durable: str, subject: str, batch: int, handler: PullHandler, linger: float = 0.0,
    keep_every: float = 0.0,
) -> None:
    """Consume a durable pull consumer forever, handing each batch (raw messages) to ``handler``.

    Handlers ack (or nak) themselves: a batch left unacked (a crash) is redelivered by JetStream after the ack
    wait. ``subject`` names the consumer's filter (for logs).

    ``linger`` (seconds): while messages keep coming, the next batch starts no sooner than ``linger`` after
    the previous one did, so that it gathers more: under load, fewer and larger batches mean far fewer
    round trips (and wake-ups) for every stage downstream. Messages keep coming when the previous batch
    was partial but not lone, or when it started less than ``linger`` after the one before it (a steady
    stream of lone messages: 500 a second would otherwise make 500 batches). A lone message after a quiet
    period (light load) is never held back.

    ``keep_every`` (seconds, below the consumer's ack wait): while a batch is handled, the messages that arrived
    behind it are kept in progress at this period, so a long batch spends none of their deliveries.
    """
    await PullConsumer(nc, stream, durable, subject, batch, handler, linger, keep_every).run()
