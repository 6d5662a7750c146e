"""Poison isolation for pulled batches: one bad message is dead-lettered alone, the others are handled and acked.

The decoded messages of a pulled batch are handled as one batch for speed. If handling the batch raises,
the batch is handled again one message at a time (``isolating``), so whatever one message raises (KeyError,
IndexError, OverflowError, RecursionError, anything) it alone is dead-lettered with the reason and
terminated, while the others are handled and acked. Only a failure of the infrastructure itself (NATS or
Redis away or busy, a lock not obtained in time: ``transient``) sends messages back for a later redelivery,
a bounded number of times.

A full output stream is neither: it is back-pressure (``hold``). The batch is kept in progress, its refused outputs
are published again once there is room, and the pull loop waits meanwhile, so the stage holds its input where it is
instead of spending its deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import nats.errors
import nats.js.errors
import redis.exceptions
from nats.aio.msg import Msg

from shared.bus.pull import PullHandler
from shared.bus.runtime import Bus, StreamFull
from shared.settings import Settings

log = logging.getLogger("gantry.service")


class Hosted(Protocol):
    """What failure handling needs of a service: its name, settings and bus."""

    @property
    def name(self) -> str:
        """The service's name (dead letters say who rejected a message)."""
        ...

    @property
    def settings(self) -> Settings:
        """Its settings (``max_deliver``, ``ack_wait_s``)."""
        ...

    @property
    def bus(self) -> Bus:
        """Its publishing side (dead letters)."""
        ...


class SplitBatch(Exception):
    """Handling a batch of several messages failed on something other than the infrastructure: the pull
    loop's ``isolating`` wrapper hands the batch's messages to the handler again one at a time."""


class Retry(Exception):
    """A race another attempt resolves (e.g. a commit landed while a worker was being forgotten): the message is
    redelivered, never dead-lettered."""


BOUND_OF_ACK_WAIT = 0.75  # a pulled batch's handling is cut off after this share of the ack wait


class TooSlow(Exception):
    """Handling a pulled batch outlasted most of the ack wait (after which JetStream hands it to a sibling anyway):
    cut off.
    A batch of several is handled again one message at a time, each under the same bound; a lone message that still
    outlasts it is retried like an infrastructure failure (a slow Redis looks the same), and dead-lettered once its
    deliveries run out. Before the bound, one message whose handling never ended stopped its consumer on every
    replica, and its valid batch-mates ran out of deliveries with no dead letter."""


# Failures of the infrastructure, not of a message: NATS or Redis away or busy, a lock not obtained in time
# (builtin TimeoutError and ConnectionError are OSErrors), or a race another attempt resolves. Anything else a
# handler raises is the message's.
TRANSIENT: tuple[type[BaseException], ...] = (
    Retry,
    TooSlow,
    StreamFull,  # held by ``isolating``; a caller that does not hold it retries it later, never dead-letters it
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # no stream answered a publish (JetStream restoring after a restart)
)
_TRANSIENT_REDIS_REPLIES = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of NATS or Redis (retry later) rather than of the message handled."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_TRANSIENT_REDIS_REPLIES)


def failure_reason(exc: BaseException) -> str:
    """One line for a dead letter: the exception's type and message (bounded)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


async def settle(service: Hosted, subject: str, raws: Sequence[Msg], exc: BaseException) -> None:
    """Decide the fate of messages whose handling raised ``exc``.

    A transient failure: nak with a delay, so JetStream redelivers them (past ``max_deliver`` deliveries
    they are dead-lettered and terminated instead). Anything else: the messages are poison, dead-lettered
    with the reason and terminated (callers pass a single message unless the failure is transient).
    """
    for raw in raws:
        if raw.is_acked:
            continue
        if transient(exc):
            meta = raw.metadata
            if meta.num_delivered is None or meta.num_delivered < service.settings.max_deliver:
                await raw.nak(delay=service.settings.ack_wait_s)
                continue
            reason = f"gave up after {meta.num_delivered} deliveries: {failure_reason(exc)}"
        else:
            reason = f"handling failed: {failure_reason(exc)}"
        await service.bus.dead_letter(subject, reason, raw.data)
        await raw.term()


async def ack_all(raws: Sequence[Msg]) -> None:
    """Ack every message of a handled batch (those not already acked or terminated)."""
    for raw in raws:  # an ack only queues bytes for the connection's flusher: no task per ack needed
        if not raw.is_acked:
            await raw.ack()


async def guarded(
    service: Hosted, subject: str, raws: Sequence[Msg], work: Callable[[], Awaitable[Any]]
) -> bool:
    """Run the work of ``raws``; True if it succeeded (the caller acks).

    On a transient failure (NATS or Redis away) the messages are nak'ed with a delay (``settle``), and the
    consumer keeps running. On any other failure a lone message is dead-lettered and terminated; for
    several, ``SplitBatch`` is raised so that ``isolating`` handles each message again on its own.
    """
    try:
        await work()
        return True
    except StreamFull:
        raise  # back-pressure: the pull loop's ``isolating`` holds the batch until there is room
    except Exception as exc:
        if len(raws) > 1 and not transient(exc):
            log.warning("%s failed a batch of %d on %s (%s): handling each alone", service.name, len(raws),
                        subject, failure_reason(exc))
            raise SplitBatch(failure_reason(exc)) from exc
        log.exception("%s failed on %s", service.name, subject)
        await settle(service, subject, raws, exc)
        return False


async def run_batch(
    service: Hosted, subject: str, raws: Sequence[Msg], work: Callable[[], Awaitable[Any]]
) -> None:
    """``guarded`` then ack the whole batch on success."""
    if await guarded(service, subject, raws, work):
        await ack_all(raws)


def isolating(service: Hosted, subject: str, handler: PullHandler) -> PullHandler:
    """``handler`` for pulled batches, with poison isolation: if it fails on a batch of several messages
    (``SplitBatch``, ``TooSlow``, or anything it let escape), each message it has not settled yet is handed to it
    again on its own; whatever a lone message still raises settles that message alone (``settle``). Each call is
    bounded by the ack wait (``TooSlow``)."""
    # under the ack wait, with room to say "in progress" for the messages still waiting before JetStream redelivers
    bound = service.settings.ack_wait_s * BOUND_OF_ACK_WAIT

    async def bounded(raws: list[Msg]) -> None:
        cut = asyncio.timeout(bound)
        try:
            async with cut:
                await handler(raws)
        except TimeoutError as exc:
            if cut.expired():  # the bound's, not a TimeoutError the handler raised (that one is transient as it is)
                raise TooSlow(f"handling {len(raws)} message(s) took longer than {bound:g} s (of the "
                              f"{service.settings.ack_wait_s:g} s ack wait)") from exc
            raise

    async def handle(raws: list[Msg]) -> None:
        try:
            await bounded(raws)
            return
        except StreamFull as full:
            await hold(service, subject, raws, full)
            return
        except Exception as exc:
            if len(raws) == 1:
                await _settle_escaped(service, subject, raws[0], exc)
                return
            if transient(exc) and not isinstance(exc, TooSlow):
                # NATS or Redis away: every message would fail alone too; retry them later
                log.warning("%s: a batch on %s failed: %s", service.name, subject, failure_reason(exc))
                await settle(service, subject, raws, exc)
                return
            if not isinstance(exc, SplitBatch):
                log.warning("%s: a batch on %s raised %s: handling each message alone", service.name, subject,
                            failure_reason(exc))
        # the ones not settled yet restart their ack wait, now and every quarter of it while they are handled alone,
        # one after another: they would otherwise be redelivered to a sibling meanwhile (the cut-off batch already
        # used most of one wait, and one message alone may take three quarters of another)
        keep = asyncio.ensure_future(_in_progress(raws, service.settings.ack_wait_s / 4))
        try:
            for raw in raws:
                if raw.is_acked:
                    continue  # handled before the failure (acked), or settled already (dead-lettered)
                try:
                    await bounded([raw])
                except StreamFull as full:
                    await hold(service, subject, [raw], full)
                except Exception as exc:
                    await _settle_escaped(service, subject, raw, exc)
        finally:
            keep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep

    return handle


HOLD_PAUSE_S = (0.05, 1.0)  # the first pause before publishing into a full stream again, and the longest
HOLD_SAID_EVERY_S = 60.0
_held_said: dict[tuple[str, str], float] = {}  # (service, subject) -> when a hold was last logged


async def hold(service: Hosted, subject: str, raws: Sequence[Msg], full: StreamFull) -> None:
    """Back-pressure: the handler of ``raws`` did all its work but its last step, the publishes ``full.rest``, which
    a full stream refused. Publish them again after a growing pause (up to 1 s) until the stream takes them, then ack
    ``raws``.

    Meanwhile ``raws`` are kept in progress (not redelivered, no delivery spent) and the pull loop, which waits on
    this, pulls nothing more: a stage whose output stream is full holds its own input where it is, and so on back to
    the entry point, while the stages downstream drain. Handlers publish their outputs last (a handler that let
    ``StreamFull`` escape from an earlier step would have the rest of its work skipped). A failure other than a full
    stream (NATS away) settles ``raws`` as any failure (transient: redelivered later); killed meanwhile, they are
    redelivered after the ack wait, and their outputs, published again, are deduplicated by the stream."""
    _say_held(service.name, subject, len(raws), full)
    keep = asyncio.ensure_future(_in_progress(raws, service.settings.ack_wait_s / 4))
    rest, pause = full.rest, HOLD_PAUSE_S[0]
    try:
        while rest:
            await asyncio.sleep(pause)
            pause = min(2 * pause, HOLD_PAUSE_S[1])
            try:
                await service.bus.publish_js_many(rest)
                rest = ()
            except StreamFull as again:
                rest = again.rest
        await ack_all(raws)
    except Exception as exc:
        log.warning("%s: holding %d message(s) of %s failed: %s", service.name, len(raws), subject,
                    failure_reason(exc))
        await settle(service, subject, raws, exc)
    finally:
        keep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keep


def _say_held(service: str, subject: str, held: int, full: StreamFull) -> None:
    """Log a hold once a minute per service and input subject (a full stream holds batch after batch)."""
    now = time.monotonic()
    if now - _held_said.get((service, subject), float("-inf")) < HOLD_SAID_EVERY_S:
        return
    _held_said[(service, subject)] = now
    log.warning("%s holds %d message(s) of %s until there is room (back-pressure; said once a minute): %s",
                service, held, subject, full)


async def _in_progress(raws: Sequence[Msg], every_s: float) -> None:
    """Tell JetStream the messages of ``raws`` not yet settled are still being worked on, every ``every_s``."""
    while True:
        for raw in raws:
            if not raw.is_acked:
                with contextlib.suppress(Exception):
                    await raw.in_progress()
        await asyncio.sleep(every_s)


async def _settle_escaped(service: Hosted, subject: str, raw: Msg, exc: BaseException) -> None:
    cause = exc.__cause__ if isinstance(exc, SplitBatch) and exc.__cause__ is not None else exc
    log.error("%s: a message on %s raised %s", service.name, subject, failure_reason(cause))
    await settle(service, subject, [raw], cause)
