"""What each service consumes and emits, declared once, and the AsyncAPI contract generated from it.

A host service lists its ``Consumes`` and ``Emits`` (class attributes); the host adds what every service
reads and writes (the snapshot feed, dead letters). The same declarations

- bind the runtime: ``PlacementService.pull`` and ``listen`` refuse a subject the service did not declare,
  and the bus logs an error for a publish on an undeclared subject;
- become FastStream subscribers and publishers (``faststream_broker``), from which FastStream writes the
  AsyncAPI document (``python -m ops.asyncapi`` → ``docs/asyncapi.json``; a test fails when it is stale).

The FastStream broker built here is never connected: messages flow through the host's own pull loops and
subscriptions, measured 3× cheaper per message and without FastStream's partial-batch stalls
(``bench/bus_pull.py``, docs/bus.md). Payload schemas come from msgspec (the structs the services decode),
given to FastStream as explicit JSON schemas.
"""

# No ``from __future__ import annotations``: the declaration handlers' annotations must be real objects.

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from faststream.nats import JStream, NatsBroker, PullSub
from pydantic import WithJsonSchema


@dataclass(frozen=True)
class Consumes:
    """A subject a service reads and the message on it: from a JetStream stream through the durable pull
    consumer ``durable``, or from core NATS (fan-out, or split between replicas by ``queue``)."""

    subject: str
    kind: type[msgspec.Struct]
    summary: str
    stream: str = ""
    durable: str = ""
    queue: str = ""


@dataclass(frozen=True)
class Emits:
    """A subject a service publishes (``*`` and ``>`` as in NATS for per-worker or per-instance subjects), the
    message on it, and whether it is a durable JetStream publish."""

    subject: str
    kind: type[msgspec.Struct]
    summary: str
    jetstream: bool = False


@dataclass(frozen=True)
class Contract:
    """One service's declarations."""

    service: str
    description: str
    consumes: tuple[Consumes, ...]
    emits: tuple[Emits, ...]

    def consumed(self, subject: str, stream: str = "", durable: str = "", queue: str = "") -> bool:
        """Whether this subject (through this consumer, or queue group) is declared."""
        return any(
            c.subject == subject and c.stream == stream and c.durable == durable and c.queue == queue
            for c in self.consumes
        )

    def emit_check(self) -> Callable[[str], bool]:
        """A predicate: is a concrete subject covered by one of the declared ``emits``?"""
        patterns = [e.subject for e in self.emits]
        cache: dict[str, bool] = {}

        def declared(subject: str) -> bool:
            got = cache.get(subject)
            if got is None:
                got = any(subject_matches(p, subject) for p in patterns)
                if len(cache) < 10_000:
                    cache[subject] = got
            return got

        return declared


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(got) == len(want)


def json_schema(kind: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON schema of a message as msgspec decodes it, with every reference inlined (the AsyncAPI
    document holds one schema per message, self-contained)."""
    schema = msgspec.json.schema(kind)
    defs = schema.pop("$defs", {})
    inlined: dict[str, Any] = _inline(schema, defs, ())
    return inlined


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen:  # a recursive type: keep the name only
                return {"title": name, "type": "object"}
            return _inline(defs[name], defs, (*seen, name))
        return {k: _inline(v, defs, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs, seen) for v in node]
    return node


def payload(kind: type[msgspec.Struct]) -> Any:
    """A type FastStream (through pydantic) documents with the msgspec schema of ``kind``."""
    return Annotated[dict[str, Any], WithJsonSchema(json_schema(kind))]


def faststream_broker(contract: Contract) -> NatsBroker:
    """The contract as FastStream declarations on a broker that is never connected: a subscriber per consumed
    subject (pull consumers with their stream and durable name), a publisher per emitted subject."""
    broker = NatsBroker()
    for c in contract.consumes:
        options: dict[str, Any] = {}
        if c.stream:
            options = {"stream": JStream(c.stream, declare=False), "durable": c.durable, "pull_sub": PullSub()}
        elif c.queue:
            options = {"queue": c.queue}
        broker.subscriber(
            c.subject, title=f"{contract.service}:in:{c.subject}" + (f":{c.queue}" if c.queue else ""),
            description=c.summary, **options,
        )(_declaration(c.kind))
    for e in contract.emits:
        broker.publisher(
            e.subject, title=f"{contract.service}:out:{e.subject}", description=e.summary, schema=payload(e.kind)
        )
    return broker


def _declaration(kind: type[msgspec.Struct]) -> Callable[..., Any]:
    async def handler(message: Any) -> None:
        """Declaration only: the host consumes this subject through its own pull loop or subscription."""

    handler.__annotations__ = {"message": payload(kind), "return": None}
    handler.__name__ = kind.__name__
    return handler


def asyncapi(contracts: Iterable[Contract], version: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every contract (FastStream's generator), as plain JSON data."""
    from faststream.specification import AsyncAPI

    brokers = [faststream_broker(c) for c in contracts]
    spec = AsyncAPI(
        *brokers, title="Gantry", version=version, schema_version="3.0.0",
        description="Every message between Gantry's services: generated from the services' declarations "
        "(shared/host/contract.py) by `python -m ops.asyncapi`.",
    )
    doc: dict[str, Any] = msgspec.json.decode(spec.to_specification().to_json())
    return doc


def merge(*parts: Sequence[Any]) -> tuple[Any, ...]:
    """Concatenate declaration tuples, dropping exact duplicates (in order)."""
    out: list[Any] = []
    for part in parts:
        out += [d for d in part if d not in out]
    return tuple(out)
