"""Messages a durable consumer gave up on: JetStream's max-deliveries advisory, turned into the message itself.

A message whose handling fails is dead-lettered by the host at its last delivery (``shared.host.isolation``). One
whose deliveries run out without the host seeing a last attempt (the process killed at each delivery, acks lost
with their connection) was simply no longer delivered: no dead letter, nothing said. JetStream publishes an
advisory when a consumer gives up on a message; the watcher reads the message back from the stream by its
sequence and hands it on (the host dead-letters it), so no work vanishes unseen.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("gantry.bus")

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
GET = "$JS.API.STREAM.MSG.GET"

OnExhausted = Callable[[str, bytes, int], Awaitable[None]]  # (the message's subject, its payload, deliveries)


def advisory_subject(stream: str, durable: str) -> str:
    """Where JetStream says ``durable`` of ``stream`` gave up on a message."""
    return f"{ADVISORY}.{stream}.{durable}"


def get_subject(stream: str) -> str:
    """Where a message of ``stream`` is read back by its sequence."""
    return f"{GET}.{stream}"


class _Advisory(msgspec.Struct):
    stream_seq: int
    deliveries: int = 0


_advisory = msgspec.json.Decoder(_Advisory)


async def watch_exhausted(nc: Client, stream: str, durable: str, on_exhausted: OnExhausted) -> Subscription:
    """Hand every message ``durable`` gives up on to ``on_exhausted`` (replicas of one service share the work: a
    queue group per consumer). A message already gone from the stream (its age, or a purge) is logged, not handed."""

    async def on_advisory(msg: Msg) -> None:
        try:
            adv = _advisory.decode(msg.data)
            got = await nc.jetstream().get_msg(stream, adv.stream_seq)
        except Exception as exc:  # a malformed advisory, or the message no longer in the stream
            log.error("%s/%s gave up on a message that cannot be read back (%s)", stream, durable, exc)
            return
        await on_exhausted(got.subject or "", got.data or b"", adv.deliveries)

    return await nc.subscribe(advisory_subject(stream, durable), queue=f"{durable}-exhausted", cb=on_advisory)
