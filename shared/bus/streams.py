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
# The placement pipeline: one stream per stage's input, each with its own byte limit, so a stage's output never
# competes with its own input for room. With one stream for all four (an older build's GANTRY_PIPE), a stream filled
# with one stage's input refused that stage's output as well: the stage nak'ed its input and nothing downstream had
# anything to drain, until deliveries ran out (valid work dead-lettered) or messages aged out.
STREAM_REQUESTED = "GANTRY_PIPE_REQUESTED"
STREAM_FILTERED = "GANTRY_PIPE_FILTERED"
STREAM_FITTED = "GANTRY_PIPE_FITTED"
STREAM_SCORED = "GANTRY_PIPE_SCORED"
PIPE_STREAMS = (STREAM_REQUESTED, STREAM_FILTERED, STREAM_FITTED, STREAM_SCORED)
LEGACY_PIPE = "GANTRY_PIPE"  # an older build's one pipeline stream; the provisioner retires it (``retire_legacy_pipe``)
STREAM_STATUS = "GANTRY_STATUS"
STREAM_EVENTS = "GANTRY_EVENTS"
STREAM_DLQ = "GANTRY_DLQ"
ALL_STREAMS = (STREAM_CMD, *PIPE_STREAMS, STREAM_STATUS, STREAM_EVENTS, STREAM_DLQ)

DUPLICATE_WINDOW_S = 120.0
STATUS_MAX_MSG_BYTES = 1 << 20  # a worker's status report (thousands of instance reports fit)

# Durable consumer names: replicas of a service share one, so JetStream spreads work between them.
CONSUMER_SCALE = "reconciler-cmd"
CONSUMER_FILTER = "filter"
CONSUMER_FITTING = "fitting"
CONSUMER_SCORING = "scoring"
CONSUMER_COMMIT = "reconciler-commit"
CONSUMER_STATUS = "reconciler-status"


PIPE_SUBJECTS = {
    STREAM_REQUESTED: subjects.PLACEMENT_REQUESTED,
    STREAM_FILTERED: subjects.PLACEMENT_FILTERED,
    STREAM_FITTED: subjects.PLACEMENT_FITTED,
    STREAM_SCORED: subjects.PLACEMENT_SCORED,
}
"""The subject each pipeline stream stores: the input of one stage."""


STORED_OVERHEAD = {"file": 34, "memory": 16}
"""Bytes nats-server counts against a stream's byte limit for a stored message with headers, beyond its subject,
headers and payload (measured: the largest message an empty stream takes)."""
_MSG_ID_HEADER = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")  # the header block of a deduplicated publish, less the id


def stream_limits(settings: Settings) -> dict[str, int]:
    """Subject -> the byte limit of the stream that alone stores it (the pipeline's): a publish counted larger can
    never be stored there, however far its consumer drains it (``never_fits``)."""
    return dict.fromkeys(PIPE_SUBJECTS.values(), settings.pipe_max_bytes)


def never_fits(subject: str, payload: int, msg_id: str, limit: int, storage: str) -> bool:
    """Whether a deduplicated publish of ``payload`` bytes is larger than an empty stream of ``limit`` bytes takes."""
    overhead = STORED_OVERHEAD["memory" if storage == "memory" else "file"]
    return len(subject.encode()) + _MSG_ID_HEADER + len(msg_id.encode()) + payload + overhead > limit


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The streams: durable commands, the pipeline's four stage inputs and status; replayable events and dead
    letters."""
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
        *(_pipe_stream(name, subject, storage, settings) for name, subject in PIPE_SUBJECTS.items()),
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


def _pipe_stream(name: str, subject: str, storage: StorageType, settings: Settings) -> StreamConfig:
    # Interest retention: a pipeline message is gone once its one consumer acked it (candidate sets are large);
    # every consumer is declared before any service starts, so nothing is published unseen. Full, the stream refuses
    # new messages: the stage feeding it holds its own input until there is room (``shared.host.isolation.hold``).
    return StreamConfig(
        name=name, subjects=[subject], storage=storage,
        retention=RetentionPolicy.INTEREST, max_age=600, duplicate_window=DUPLICATE_WINDOW_S,
        max_bytes=settings.pipe_max_bytes, discard=DiscardPolicy.NEW,
    )


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
    """The provisioner's step: retire an older build's pipeline stream, create the missing streams, and update only
    one whose configuration differs (safe from several processes)."""
    await retire_legacy_pipe(js)
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


async def retire_legacy_pipe(js: JetStreamContext) -> bool:
    """Delete an older build's one pipeline stream (``LEGACY_PIPE``), if there is one; True if it was there.

    Its subjects overlap the stage streams', so JetStream refuses to create them beside it. What it still holds is
    placement work of the older build's services, which are stopped by now (their consumers are its own): the
    replicas it was placing stay PENDING in Redis, and the reconciler requests them again (its full converge, every
    ``FULL_EVERY`` ticks, or its PENDING retries), so deleting it loses no replica. A count is logged when it was not
    empty."""
    try:
        info = await js.stream_info(LEGACY_PIPE)
    except NotFoundError:
        return False
    held = info.state.messages
    if held:
        log.warning("deleting %s, the pipeline stream of an older Gantry, with %d message(s) in flight: the replicas "
                    "they were placing stay PENDING and are requested again by the reconciler",
                    LEGACY_PIPE, held)
    else:
        log.info("deleting %s, the (empty) pipeline stream of an older Gantry", LEGACY_PIPE)
    with contextlib.suppress(NotFoundError):  # deleted meanwhile by another provisioner
        await js.delete_stream(LEGACY_PIPE)
    return True


ALL_CONSUMERS = (
    (STREAM_CMD, CONSUMER_SCALE, subjects.CMD_ALL),
    (STREAM_REQUESTED, CONSUMER_FILTER, subjects.PLACEMENT_REQUESTED),
    (STREAM_FILTERED, CONSUMER_FITTING, subjects.PLACEMENT_FILTERED),
    (STREAM_FITTED, CONSUMER_SCORING, subjects.PLACEMENT_FITTED),
    (STREAM_SCORED, CONSUMER_COMMIT, subjects.PLACEMENT_SCORED),
    (STREAM_STATUS, CONSUMER_STATUS, subjects.INSTANCE_STATUS),
)
"""Every durable consumer (stream, name, subject): the provisioner declares all of them before any service starts
(interest-retention streams drop what no consumer wants yet)."""


async def delete_streams(js: JetStreamContext) -> None:
    """Remove every Gantry stream, an older build's too (tests and `gantry` resets start from nothing)."""
    for name in (*ALL_STREAMS, LEGACY_PIPE):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)
