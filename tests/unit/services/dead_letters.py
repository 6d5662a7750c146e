"""The reconciler's dead letters as a test sees them on a real NATS connection."""

from __future__ import annotations

from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.bus import subjects
from shared.bus.messages import ErrorEvent, decode


async def dead_letters(nc: Client) -> list[ErrorEvent]:
    """A list that fills with every dead letter the reconciler sends from now on (subscribed when this returns)."""
    got: list[ErrorEvent] = []

    async def keep(msg: Msg) -> None:
        got.append(decode(msg.data, ErrorEvent))

    await nc.subscribe(subjects.dead_letter("reconciler"), cb=keep)
    await nc.flush()
    return got
