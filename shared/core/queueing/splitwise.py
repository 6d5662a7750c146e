"""Splitwise (prefill/decode split) decisions, pure: live nodes, blurred least load, and node load.

Facts from FastDeploy's ``splitwise_scheduler.py``: inference nodes publish ``{role, load, ts, host,
protocols}`` every sync period; the front drops nodes whose heartbeat is older than the expiry; a request
goes to a prefill (or mixed) node and, unless that node is mixed, to a decode node, each picked at random
among the nodes whose load is below ``least + step`` ("blurred least load"): for prefill the step is
``max(100, min(500, L / (2 if L < 1000 else 10)))`` with ``L`` prompt tokens, for decode ``min(#nodes, 10)``.
Prefill load counts the prompt tokens a node has taken and not finished, decode load the requests.
The KV cache moves by ``ipc`` when both nodes share a host and the decode node offers it, else ``rdma``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from shared.core.queueing.request import QueuedRequest
from shared.core.roles import NodeRole


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One inference node's heartbeat record."""

    node: str
    role: NodeRole
    load: int = 0
    ts: float = 0.0
    host: str = ""
    protocols: tuple[str, ...] = ("rdma",)


_node_dec = msgspec.json.Decoder(NodeInfo)


def parse_node(raw: bytes | str) -> NodeInfo | None:
    """A heartbeat record, or None when malformed (unknown role, bad JSON): such a node is never picked."""
    try:
        return _node_dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def live_nodes(records: Iterable[NodeInfo], now: float, expire_s: float) -> list[NodeInfo]:
    """Nodes whose last heartbeat is at most ``expire_s`` old."""
    return [n for n in records if now - n.ts <= expire_s]


def prefill_step(prompt_len: int) -> int:
    """Width of the prefill window in prompt tokens."""
    return max(100, min(500, int(prompt_len / (2 if prompt_len < 1000 else 10))))


def decode_step(num_nodes: int) -> int:
    """Width of the decode window in requests."""
    return min(num_nodes, 10)


def blurred_least_load(nodes: Sequence[NodeInfo], step: int, rng: random.Random) -> NodeInfo:
    """Random among the nodes whose load is below the least load plus ``step`` (the least loaded always is)."""
    if not nodes:
        raise ValueError("no node to choose from")
    ordered = sorted(nodes, key=lambda n: (n.load, n.node))
    ceiling = ordered[0].load + step
    eligible = [n for n in ordered if n.load < ceiling] or ordered[:1]
    return rng.choice(eligible)


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where a request runs: a prefill (or mixed) node, and a decode node unless the first is mixed."""

    prefill: str
    decode: str | None = None
    protocol: str | None = None


def transfer_protocol(p: NodeInfo, d: NodeInfo) -> str:
    """How the KV cache moves from ``p`` to ``d``."""
    offered = set(d.protocols)
    if {"ipc", "rdma"} <= offered:
        return "ipc" if p.host and p.host == d.host else "rdma"
    return d.protocols[0] if d.protocols else "rdma"


def assign(prompt_len: int, nodes: Sequence[NodeInfo], rng: random.Random) -> Assignment | None:
    """Pick the nodes for a request; None when the live nodes cannot serve it (no mixed, and P or D missing)."""
    firsts = [n for n in nodes if n.role.prefills]
    decoders = [n for n in nodes if n.role is NodeRole.DECODE]
    if not firsts or (not decoders and not any(n.role is NodeRole.MIXED for n in firsts)):
        return None
    if not decoders:
        firsts = [n for n in firsts if n.role is NodeRole.MIXED]
    p = blurred_least_load(firsts, prefill_step(prompt_len), rng)
    if p.role is NodeRole.MIXED:
        return Assignment(prefill=p.node)
    d = blurred_least_load(decoders, decode_step(len(decoders)), rng)
    return Assignment(prefill=p.node, decode=d.node, protocol=transfer_protocol(p, d))


class NodeLoad:
    """An inference node's own load: prompt tokens (prefill, mixed) or requests (decode) not yet finished.

    A contribution with no result for ``release_s`` is dropped (a lost request must not pin load forever).
    """

    def __init__(self, role: NodeRole, release_s: float) -> None:
        self.role = role
        self.release_s = release_s
        self._items: dict[str, tuple[int, float]] = {}  # id -> (contribution, last activity)
        self.load = 0

    def add(self, request_id: str, prompt_len: int, now: float) -> None:
        """Count a request taken by this node (idempotent per id)."""
        if request_id in self._items:
            return
        amount = prompt_len if self.role.prefills else 1
        self._items[request_id] = (amount, now)
        self.load += amount

    def touch(self, request_id: str, now: float) -> None:
        """A result was produced: the request is alive."""
        item = self._items.get(request_id)
        if item is not None:
            self._items[request_id] = (item[0], now)

    def finish(self, request_id: str) -> None:
        """The request finished here (or failed): release its load."""
        item = self._items.pop(request_id, None)
        if item is not None:
            self.load -= item[0]

    def expire(self, now: float) -> list[str]:
        """Release requests silent for ``release_s``; their ids."""
        gone = [rid for rid, (_, t) in self._items.items() if now - t >= self.release_s]
        for rid in gone:
            self.finish(rid)
        return gone


class SplitRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request as queued on an inference node in splitwise mode: where each phase runs, who answers."""

    request: QueuedRequest
    prefill: str
    decode: str | None = None
    protocol: str | None = None
    front: str = ""  # the node holding the client connection (results go there)
