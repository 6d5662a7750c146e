"""Publishing and raw subscriptions shared by every Gantry service (straight on nats-py; pull loops:
``shared.bus.pull``).

JetStream publishes carry a ``Nats-Msg-Id`` so a re-publish after a crash is dropped by the stream's
duplicate window; rejected input goes to the dead-letter subject as an ErrorEvent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from faststream.nats import NatsBroker
from faststream.security import BaseSecurity, SASLPlaintext
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.bus import subjects
from shared.bus.connection import inbox_prefix as inbox_prefix  # re-exported: callers import it from here
from shared.bus.connection import nats_options as nats_options  # re-exported
from shared.bus.messages import ErrorEvent, MessageError, decode, encode
from shared.bus.streams import consumer_config, consumer_matches, ensure_streams, never_fits, stream_configs
from shared.core.limits import MAX_MESSAGE_BYTES
from shared.envsettings import without_user
from shared.settings import Settings

T = TypeVar("T", bound=msgspec.Struct)

log = logging.getLogger("gantry.bus")

Publish = tuple[str, msgspec.Struct, str]
"""A durable publish: subject, message, ``Nats-Msg-Id``."""


class Bus:
    """A connected service's publishing side: core, JetStream (deduped) and dead letters.

    ``declared`` (from the service's contract) says whether a subject is one the service declared it emits;
    a publish on any other is logged as an error once per subject (the contract would be lying).
    """

    def __init__(
        self, nc: Client, service: str, declared: Callable[[str], bool] | None = None,
        on_dead_letter: Callable[[str], None] | None = None, stream_bytes: dict[str, int] | None = None,
        storage: str = "file",
    ) -> None:
        self.nc = nc
        # subject -> the byte limit of its stream (``streams.stream_limits``): a refused publish larger than that is
        # ``TooLarge``, not back-pressure; ``storage``: the streams' (their accounting of a message differs)
        self.stream_bytes = stream_bytes or {}
        self.storage = storage
        self.on_dead_letter = on_dead_letter  # the service's metrics count rejections per subject
        self.js: JetStreamContext = nc.jetstream()
        self.service = service
        self.declared = declared
        self._undeclared: set[str] = set()

    def _check(self, subject: str) -> None:
        if self.declared is not None and subject not in self._undeclared and not self.declared(subject):
            self._undeclared.add(subject)
            log.error("%s publishes on %s, which its contract does not declare", self.service, subject)

    async def publish(self, subject: str, msg: msgspec.Struct) -> None:
        """Fire-and-forget on core NATS (heartbeats, worker commands, events)."""
        self._check(subject)
        await self.nc.publish(subject, encode(msg))

    async def request(self, subject: str, msg: msgspec.Struct, timeout_s: float) -> Msg:
        """A core NATS request; the reply (raises nats' TimeoutError or NoRespondersError without one)."""
        self._check(subject)
        return await self.nc.request(subject, encode(msg), timeout=timeout_s)

    async def publish_js(self, subject: str, msg: msgspec.Struct, msg_id: str) -> None:
        """Durable publish; waits for the stream's ack. ``msg_id`` dedupes re-publishes. Raises ``StreamFull`` when
        the stream refused it for want of room."""
        self._check(subject)
        payload = encode(msg)
        try:
            await js_publish(self.nc, subject, payload, msg_id)
        except nats.js.errors.APIError as exc:
            if not stream_full(exc):
                raise
            limit = self.stream_bytes.get(subject)
            if limit is not None and never_fits(subject, len(payload), msg_id, limit, self.storage):
                raise TooLarge(((subject, msg, msg_id),), len(payload), limit) from exc
            raise StreamFull(((subject, msg, msg_id),), str(exc.description)) from exc

    async def publish_js_many(self, items: Sequence[Publish]) -> None:
        """Several durable publishes in flight at once (one round trip of latency, not n). When some fail, the
        first failure that is not a full stream is raised; when only full streams refused some, ``StreamFull`` names
        every refused one (the others are stored)."""
        if len(items) == 1:  # most batches publish one message: no task and gathering future for it
            await self.publish_js(*items[0])
            return
        results = await asyncio.gather(*(self.publish_js(s, m, i) for s, m, i in items), return_exceptions=True)
        refused: list[Publish] = []
        too_large: list[TooLarge] = []
        why = ""
        for result in results:
            if isinstance(result, StreamFull):
                refused += result.rest
                why = result.why
            elif isinstance(result, TooLarge):
                too_large.append(result)
            elif isinstance(result, BaseException):
                raise result
        if too_large:  # a failure of those messages, not back-pressure: named with the ones refused for room
            first = too_large[0]
            raise TooLarge(tuple(p for t in too_large for p in t.rest), first.size, first.limit, tuple(refused))
        if refused:
            raise StreamFull(tuple(refused), why)

    async def dead_letter(self, subject: str, reason: str, payload: bytes = b"") -> None:
        """Report a rejected message on the dead-letter subject, and log it; a rejected message that is itself a
        dead letter is only logged and counted (``is_dead_letter``)."""
        if self.on_dead_letter is not None:
            self.on_dead_letter(subject)
        if is_dead_letter(payload):
            # A dead letter can only come back here through a consumer on the dead-letter stream delivering into one
            # of our subjects: another one would be stored and delivered again, once more per replica each turn.
            log.warning("%s rejected a dead letter delivered on %s (not dead-lettered again): %s",
                        self.service, subject, reason)
            return
        log.warning("%s rejected a message on %s: %s", self.service, subject, reason)
        event = ErrorEvent(
            service=self.service, subject=subject, reason=reason,
            payload=payload[:512].decode("utf-8", "replace"), at=time.time(),
        )
        await self.nc.publish(subjects.dead_letter(self.service), encode(event))

    async def decode_or_reject(self, subject: str, body: bytes, kind: type[T]) -> T | None:
        """The decoded message, or None after dead-lettering why it could not be decoded."""
        try:
            return decode(body, kind)
        except MessageError as exc:
            await self.dead_letter(subject, str(exc), body)
            return None


# An ``ErrorEvent``'s fields and none other (any schema version), derived from it so the two cannot drift: a payload
# with more fields is some other message whatever else it carries, and a forged report with ``service``, ``subject``
# and ``reason`` added must still reach the dead letters.
_dead_letter_shape = msgspec.json.Decoder(msgspec.defstruct(
    "DeadLetterShape", [(f.name, f.type) if f.required else (f.name, f.type, f.default)
                        for f in msgspec.structs.fields(ErrorEvent)],
    kw_only=True, forbid_unknown_fields=True))


def is_dead_letter(payload: bytes) -> bool:
    """Whether ``payload`` is a dead letter: an ``ErrorEvent``'s fields (service, subject and reason at least) and
    no other."""
    if payload[:16].lstrip()[:1] != b"{":  # the quick answer for most rejected payloads
        return False
    if len(payload) > MAX_MESSAGE_BYTES:
        return False
    try:
        _dead_letter_shape.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


# How JetStream answers a publish it has no room for: the stream at a limit it keeps by refusing new messages ("maximum
# bytes exceeded", "maximum messages exceeded": err_code 10077, the store's refusal), or the server's whole store full
# ("insufficient resources": 10023; "insufficient storage resources available": 10047).
STORE_REFUSED = 10077
NO_RESOURCES = (10023, 10047)


def stream_full(exc: nats.js.errors.APIError) -> bool:
    """Whether JetStream refused a publish for want of room (back-pressure) rather than for what was published."""
    if exc.err_code in NO_RESOURCES:
        return True
    why = exc.description or ""
    return exc.err_code == STORE_REFUSED and why.startswith("maximum") and why.endswith("exceeded")


class StreamFull(Exception):
    """Durable publishes refused because their stream is full (it refuses new messages until its consumer drains
    it): back-pressure, not a failure of the message published. ``rest``: the refused publishes, to make again once
    there is room (``Bus.publish_js_many``); the ones not named were stored."""

    def __init__(self, rest: tuple[Publish, ...], why: str = "") -> None:
        self.rest = rest
        self.why = why
        subjects_full = ", ".join(sorted({s for s, _, _ in rest}))
        super().__init__(f"the stream of {subjects_full} is full ({why or 'no room'}): {len(rest)} publish(es) refused")


class TooLarge(Exception):
    """Durable publishes refused as a full stream's are ("maximum bytes exceeded"), but each larger than its stream
    holds when empty: no draining makes room for them, so they are a failure of the messages, never back-pressure (a
    stage that held its batch for them held it for ever, and its pull loop with it). ``rest``: those publishes;
    ``full``: others of the same call refused for want of room (those not named were stored)."""

    def __init__(self, rest: tuple[Publish, ...], size: int, limit: int, full: tuple[Publish, ...] = ()) -> None:
        self.rest = rest
        self.size = size
        self.limit = limit
        self.full = full
        subjects_big = ", ".join(sorted({s for s, _, _ in rest}))
        super().__init__(f"{len(rest)} publish(es) on {subjects_big} larger than the stream holds ({size} bytes of "
                         f"payload, the stream {limit} bytes: GANTRY_PIPE_MAX_BYTES)")


class _PubAck(msgspec.Struct):
    """The one part of JetStream's publish acknowledgement a publisher needs: whether it is an error."""

    error: dict[str, Any] | None = None


_pub_ack = msgspec.json.Decoder(_PubAck)
JS_PUBLISH_TIMEOUT_S = 5.0


async def js_publish(
    nc: Client, subject: str, payload: bytes, msg_id: str, timeout: float = JS_PUBLISH_TIMEOUT_S
) -> None:
    """Publish to a stream and wait until it is stored (deduped by ``msg_id``): what nats-py's
    ``JetStreamContext.publish`` does, raising the same errors, without building a PubAck from stdlib JSON
    for every message (publishers only need to know it was stored)."""
    try:
        reply = await nc.request(subject, payload, timeout=timeout, headers={"Nats-Msg-Id": msg_id})
    except nats.errors.NoRespondersError:
        raise nats.js.errors.NoStreamResponseError from None
    ack = _pub_ack.decode(reply.data)
    if ack.error is not None:
        raise nats.js.errors.APIError.from_error(ack.error)


async def ensure_consumer(js: JetStreamContext, stream: str, durable: str, subject: str, settings: Settings) -> None:
    """Create a durable pull consumer with Gantry's ack/redelivery policy, or bring an existing one to it: a consumer
    kept from before a change of ``GANTRY_MAX_DELIVER`` or ``GANTRY_ACK_WAIT_S`` gave up on a message at its old
    limit while the services judged "last delivery" by the new one (the message vanished with no dead letter)."""
    wanted = consumer_config(durable, subject, settings)
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        try:
            await js.add_consumer(stream, wanted)
        except Exception:  # created concurrently by a sibling replica
            await js.consumer_info(stream, durable)
        return
    if not consumer_matches(info.config, wanted):
        await js.add_consumer(stream, wanted)  # JetStream updates what may change of a durable (these fields may)


async def prepare(nc: Client, settings: Settings, consumers: Sequence[tuple[str, str, str]]) -> None:
    """The provisioner's step (an identity with the rights, e.g. the admin): declare the streams and the given
    (stream, durable, subject) consumers before any service subscribes."""
    js = nc.jetstream()
    await ensure_streams(js, settings)
    for stream, durable, subject in consumers:
        await ensure_consumer(js, stream, durable, subject, settings)


PROVISION_RETRY_S = 2.0


async def missing_declarations(
    js: JetStreamContext, settings: Settings, consumers: Sequence[tuple[str, str, str]], declare: bool
) -> list[str]:
    """The streams of ``consumers`` and those consumers that do not exist (``stream`` or ``stream/durable``).
    With ``declare`` (a bus without identities, where services declare for themselves) a missing one is
    created first; a refusal leaves it missing. An existing stream is never updated."""
    configs = {cfg.name: cfg for cfg in stream_configs(settings)}
    missing: list[str] = []
    for stream in dict.fromkeys(s for s, _, _ in consumers):
        if not await _exists(partial(js.stream_info, stream), partial(js.add_stream, configs[stream]), declare):
            missing.append(stream)
    for stream, durable, subject in consumers:
        config = consumer_config(durable, subject, settings)
        if stream in missing or not await _exists(
            partial(js.consumer_info, stream, durable), partial(js.add_consumer, stream, config), declare
        ):
            missing.append(f"{stream}/{durable}")
    return missing


async def _exists(
    info: Callable[[], Awaitable[object]], create: Callable[[], Awaitable[object]], declare: bool
) -> bool:
    """Whether ``info`` finds it, or (with ``declare``) ``create`` made it."""
    try:
        await info()
        return True
    except NotFoundError:
        pass
    except Exception as exc:  # NATS away or slow: not known to exist, asked again
        log.debug("JetStream info failed: %s", exc)
        return False
    if not declare:
        return False
    try:
        await create()
        return True
    except Exception as exc:  # refused (no rights: the provisioner's job) or raced by a sibling: asked again
        log.debug("JetStream declaration failed: %s", exc)
        return False


async def await_provisioned(
    nc: Client, settings: Settings, consumers: Sequence[tuple[str, str, str]], declare: bool, service: str,
    retry_s: float = PROVISION_RETRY_S,
) -> None:
    """Return once the streams and durable consumers a service reads exist; until then say what is missing
    and ask again every ``retry_s``. Services do not reconfigure streams: provisioning is the launcher's."""
    js = nc.jetstream()
    while missing := await missing_declarations(js, settings, consumers, declare):
        log.warning(
            "%s waiting for %s to be provisioned (`gantry up` declares them as the admin); retrying in %.0fs",
            service, ", ".join(missing), retry_s,
        )
        await asyncio.sleep(retry_s)


def make_broker(settings: Settings, no_echo: bool = False, kind: type[NatsBroker] = NatsBroker) -> NatsBroker:
    """A FastStream NATS broker (of class ``kind``) with quiet per-message logging (it costs throughput);
    ``no_echo``: the server does not deliver the connection's own publishes back to its subscriptions."""
    quiet = logging.getLogger("gantry.faststream")
    quiet.setLevel(logging.WARNING)
    options = nats_options(settings)
    tls = options.get("tls")
    url = settings.nats_url
    security: BaseSecurity | None = None  # FastStream's way to take a TLS context and credentials
    if "user" in options:  # decoded: nats-py would send the URL's percent-encoded userinfo as written
        security = SASLPlaintext(options["user"], options["password"], ssl_context=tls)
        url = without_user(url)  # FastStream refuses credentials both in the URL and in ``security``
    elif tls is not None:
        security = BaseSecurity(ssl_context=tls)
    return kind(
        url, logger=quiet, log_level=logging.DEBUG, max_reconnect_attempts=-1, security=security,
        inbox_prefix=options["inbox_prefix"], no_echo=no_echo,
    )


RawHandler = Callable[[bytes], Awaitable[None]]
ReportHandler = Callable[[bytes, str], Awaitable[None]]
"""A raw handler also told the concrete subject a message came on (worker reports: whose subject it was)."""


async def listen_reports(nc: Client, subject: str, handler: ReportHandler, queue: str = "") -> None:
    """Like ``listen``, handing ``handler`` each message's body and concrete subject."""

    async def deliver(msg: Msg) -> None:
        try:
            await handler(msg.data, msg.subject)
        except Exception:
            log.exception("handler for %s failed", subject)

    await nc.subscribe(subject, queue=queue, cb=deliver)


async def listen(nc: Client, subject: str, handler: RawHandler, queue: str = "") -> None:
    """Subscribe ``handler`` to the raw bytes of every core-NATS message on ``subject``.

    Straight on the nats-py connection rather than a FastStream subscriber: feed subjects carry
    hundreds of messages a second into every service, and the framework's per-message dependency
    injection and logging scopes cost more than applying the message. A failing handler is logged; the
    subscription lives on.
    """

    async def deliver(msg: Msg) -> None:
        try:
            await handler(msg.data)
        except Exception:
            log.exception("handler for %s failed", subject)

    await nc.subscribe(subject, queue=queue, cb=deliver)


def nats_client(broker: NatsBroker) -> Client:
    """The broker's underlying nats-py connection (for deduped JetStream publishes)."""
    conn = broker.connection
    assert conn is not None, "broker not connected"
    return conn
