"""JetStream streams and durable consumers of Gantry, and how to declare them idempotently."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from shared.bus import subjects

if TYPE_CHECKING:  # annotations only: `gantry explain` and `events` read stream names without pydantic
    from shared.settings import Settings

log = logging.getLogger("gantry.bus")

STREAM_CMD = "GANTRY_CMD"
STREAM_PIPE = "GANTRY_PIPE"
STREAM_STATUS = "GANTRY_STATUS"
STREAM_EVENTS = "GANTRY_EVENTS"
STREAM_DLQ = "GANTRY_DLQ"
ALL_STREAMS = (STREAM_CMD, STREAM_PIPE, STREAM_STATUS, STREAM_EVENTS, STREAM_DLQ)

DUPLICATE_WINDOW_S = 120.0
STATUS_MAX_MSG_BYTES = 1 << 20  # a worker's status report (thousands of instance reports fit)

# Durable consumer names: replicas of a service share one, so JetStream spreads work between them.
CONSUMER_SCALE = "reconciler-cmd"
CONSUMER_FILTER = "filter"
CONSUMER_FITTING = "fitting"
CONSUMER_SCORING = "scoring"
CONSUMER_COMMIT = "reconciler-commit"
CONSUMER_STATUS = "reconciler-status"


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The five streams: durable commands, pipeline and status; replayable events and dead letters."""
    storage = StorageType.MEMORY if settings.js_storage == "memory" else StorageType.FILE
    # Each stream has its own share of the server's store (208 MiB in all, under the local stack's 256 MB of memory
    # storage): one worker flooding its status subject filled the whole store in 17 s, and every identity's durable
    # publishes failed. Each holds only what is not handled yet (interest: a message goes once its consumer acked
    # it), and full, refuses new messages (discard new): nothing unhandled is ever thrown away, and the sender hears
    # of it. (The commands' stream kept handled commands for a day: full, it would have refused `gantry scale` after
    # ~16 MiB of commands in a day, an autoscaler's every few seconds; dropping its oldest instead lost commands the
    # reconciler had not read.)
    return [
        StreamConfig(
            name=STREAM_CMD, subjects=[subjects.CMD_ALL], storage=storage,
            retention=RetentionPolicy.INTEREST, max_age=24 * 3600, duplicate_window=DUPLICATE_WINDOW_S,
            max_bytes=16 << 20, discard=DiscardPolicy.NEW,
        ),
        # Interest retention: a pipeline message is gone once its one consumer acked it (candidate sets
        # are large); every consumer is declared before any service starts, so nothing is published unseen.
        StreamConfig(
            name=STREAM_PIPE, subjects=[subjects.PIPE_ALL], storage=storage,
            retention=RetentionPolicy.INTEREST, max_age=600, duplicate_window=DUPLICATE_WINDOW_S,
            max_bytes=settings.pipe_max_bytes, discard=DiscardPolicy.NEW,
        ),
        StreamConfig(
            name=STREAM_STATUS, subjects=[subjects.INSTANCE_STATUS], storage=storage,
            retention=RetentionPolicy.INTEREST, max_age=3600, duplicate_window=DUPLICATE_WINDOW_S,
            max_bytes=32 << 20, max_msg_size=STATUS_MAX_MSG_BYTES, discard=DiscardPolicy.NEW,
        ),
        StreamConfig(
            name=STREAM_EVENTS, subjects=[subjects.EVENTS_ALL], storage=storage,
            retention=RetentionPolicy.LIMITS, max_age=3600, max_msgs=200_000, max_bytes=64 << 20,
        ),
        StreamConfig(
            name=STREAM_DLQ, subjects=[subjects.DEAD_LETTER_ALL], storage=storage,
            retention=RetentionPolicy.LIMITS, max_age=24 * 3600, max_msgs=100_000, max_bytes=32 << 20,
        ),
    ]


def consumer_config(durable: str, subject: str, settings: Settings) -> ConsumerConfig:
    """A durable pull consumer: explicit ack, bounded redelivery with growing backoff."""
    backoff = [settings.ack_wait_s * (2**i) for i in range(max(1, settings.max_deliver - 1))]
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        backoff=backoff,
        max_ack_pending=20_000,
    )


def consumer_matches(existing: ConsumerConfig, wanted: ConsumerConfig) -> bool:
    """Whether a consumer's configuration already is Gantry's: its filter, ack wait, deliveries and backoff."""
    if (existing.filter_subject, existing.max_deliver, existing.max_ack_pending) != (
            wanted.filter_subject, wanted.max_deliver, wanted.max_ack_pending):
        return False
    if not math.isclose(_or(existing.ack_wait, 0.0), _or(wanted.ack_wait, 0.0)):
        return False
    got, want = list(existing.backoff or ()), list(wanted.backoff or ())
    return len(got) == len(want) and all(math.isclose(a, b) for a, b in zip(got, want, strict=True))


def stream_matches(existing: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether a stream's configuration already is the one Gantry gives it: subjects, storage, retention and
    limits (a limit Gantry leaves unset must be unlimited on the server, so a shrunk stream does not match)."""
    if (existing.subjects, existing.storage, existing.retention) != (wanted.subjects, wanted.storage, wanted.retention):
        return False
    for name in ("max_msgs", "max_bytes", "max_msg_size"):  # -1: unlimited
        if _or(getattr(existing, name), -1) != _or(getattr(wanted, name), -1):
            return False
    if (existing.discard or DiscardPolicy.OLD) != (wanted.discard or DiscardPolicy.OLD):
        return False
    if not math.isclose(_or(existing.max_age, 0.0), _or(wanted.max_age, 0.0)):  # seconds (0: forever)
        return False
    return wanted.duplicate_window is None or math.isclose(_or(existing.duplicate_window, 0.0), wanted.duplicate_window)


def _or(value: float | None, unset: float) -> float:
    return unset if value is None else value


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """The provisioner's step: create the missing streams, and update only one whose configuration differs
    (safe from several processes)."""
    for cfg in stream_configs(settings):
        try:
            info = await js.stream_info(cfg.name or "")
        except NotFoundError:
            try:
                await js.add_stream(cfg)
                continue
            except Exception:  # another process created it between our calls
                info = await js.stream_info(cfg.name or "")
        if stream_matches(info.config, cfg):
            continue
        try:
            await js.update_stream(cfg)
        except Exception as exc:  # e.g. a retention change on an old stream: keep it, say so
            log.warning("stream %s kept its existing configuration: %s", cfg.name, exc)


ALL_CONSUMERS = (
    (STREAM_CMD, CONSUMER_SCALE, subjects.CMD_ALL),
    (STREAM_PIPE, CONSUMER_FILTER, subjects.PLACEMENT_REQUESTED),
    (STREAM_PIPE, CONSUMER_FITTING, subjects.PLACEMENT_FILTERED),
    (STREAM_PIPE, CONSUMER_SCORING, subjects.PLACEMENT_FITTED),
    (STREAM_PIPE, CONSUMER_COMMIT, subjects.PLACEMENT_SCORED),
    (STREAM_STATUS, CONSUMER_STATUS, subjects.INSTANCE_STATUS),
)
"""Every durable consumer (stream, name, subject): the provisioner declares all of them before any service starts
(interest-retention streams drop what no consumer wants yet)."""


async def delete_streams(js: JetStreamContext) -> None:
    """Remove every Gantry stream (tests and `gantry` resets start from nothing)."""
    for name in ALL_STREAMS:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)
