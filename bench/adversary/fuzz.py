"""Hostile input for every subject Gantry consumes: hypothesis strategies, bulk publishing and the checks after.

Two families per subject: malformed bytes (random bytes, truncated or mistyped JSON, nesting thousands deep,
invalid UTF-8) and schema-shaped hostile values (a valid message of the running cluster with one field
replaced by a huge or negative number, infinity, an empty or 1 MB string, a name with wildcards, quotes or a
path, an unknown GPU, an unknown enum). Every payload is invalid by construction, so after a fuzz run nothing
of it may be stored: ``junk`` lists anything in Redis outside the cluster the fuzzer started with.

Drawing examples through hypothesis's own engine (not ``.example()``, which is ~10x slower) keeps 10,000
payloads per subject to seconds; the draw falls back to ``.example()`` if the engine's internals move.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st
from nats.aio.client import Client

from shared.bus import subjects
from shared.core.limits import (
    MAX_GPU_VRAM,
    MAX_REPLICAS,
    MAX_WORKER_RAM,
)
from shared.core.placement.domain import GIB, Instance, ModelSpec
from shared.state.store import Keys, StateStore

BIG = "x" * (1 << 20)
NAMES = ["", "*", ">", "w.*", "gantry.>", 'w"0', "w'0", "../../etc/passwd", "w 0", "w0\n", "ｗ0", "$JS.API.x",
         "-w0", "w0-", "a" * 64, "w:0", "w|0", "w;0", "\\", "w0\r", "\nw0"]
NUMBERS = [-1, -(2**63), 2**63, 2**64, 10**40, 123456789012345678901234567890123456789, MAX_REPLICAS + 1,
           MAX_GPU_VRAM + 1, MAX_WORKER_RAM + 1, 1.5, -0.5, float("inf"), float("-inf"), float("nan")]
INDEXES = [-1, 1024, 2**40, 2**64, 0.5]
FRACTIONS = [-0.1, 1.5, float("inf"), float("nan")]
ENUMS = ["", "BOGUS", "running", None, 3]


def hostile(kind: str) -> st.SearchStrategy[Any]:
    """A hostile value for a field of ``kind`` (name, count, index, fraction, text, enum, list)."""
    big = st.integers(0, 199).map(lambda i: BIG if i == 0 else "y" * 2000)  # 1 MB now and then, else 2 KB
    if kind == "name":
        return st.one_of(st.sampled_from(NAMES), big, st.text(max_size=8).map(lambda s: s + "*"))
    if kind == "count":
        return st.one_of(st.sampled_from(NUMBERS), st.integers(max_value=-1), st.integers(min_value=2**53))
    if kind == "index":
        return st.one_of(st.sampled_from(INDEXES), st.integers(min_value=1024), st.integers(max_value=-1))
    if kind == "fraction":
        return st.one_of(st.sampled_from(FRACTIONS), st.floats(min_value=1.0001, allow_infinity=True))
    if kind == "text":
        return st.one_of(big, st.integers(), st.lists(st.integers(), max_size=3))
    if kind == "enum":
        return st.sampled_from(ENUMS)
    if kind == "list":
        return st.one_of(st.integers(), st.text(max_size=4), st.lists(st.sampled_from(NUMBERS), min_size=1, max_size=3))
    raise ValueError(kind)


@dataclass(frozen=True)
class Target:
    """One consumed subject: a valid base message and its validated fields (path -> kind)."""

    subject: str
    base: dict[str, Any]
    fields: dict[tuple[Any, ...], str]
    jetstream: bool = False


def targets(worker: str, model: ModelSpec, instance: Instance) -> list[Target]:
    """Every subject the services and workers consume, each with a valid message of this cluster as base."""
    spec = msgspec.to_builtins(model)
    gpu = {"index": 0, "vram_total": 80 * GIB}
    reg = {"worker": {"name": worker, "gpus": [gpu], "ram_total": 64 * GIB}}
    inst = msgspec.to_builtins(instance)
    item = {"instance_id": instance.id, "model": model.name}
    request = {"batch_id": "b", "items": [item], "specs": {model.name: spec}}
    decision = {"model": model.name, "score": 1.0, "breakdown": {},
                "candidate": {"worker": worker, "gpu_indexes": [0], "vram_claims": [GIB]}}
    name, count, index, frac, text, enum, lst = "name", "count", "index", "fraction", "text", "enum", "list"
    return [
        Target(subjects.SCALE, {"model": model.name, "replicas": 1, "spec": spec},
               {("model",): name, ("replicas",): count, ("spec", "name"): name, ("spec", "replicas"): count,
                ("spec", "vram_claim"): count, ("spec", "ram_claim"): count, ("spec", "weight_bytes"): count,
                ("spec", "backend"): enum, ("spec", "categories"): lst, ("spec", "source"): text}, jetstream=True),
        Target(subjects.CORDON, {"worker": worker, "gpu_index": 0},
               {("worker",): name, ("gpu_index",): index, ("cordoned",): enum}, jetstream=True),
        Target(subjects.REMOVE_WORKER, {"worker": worker}, {("worker",): name}, jetstream=True),
        Target(subjects.worker_register(worker), reg,
               {("worker", "name"): name, ("worker", "gpus", 0, "vram_total"): count,
                ("worker", "gpus", 0, "index"): index, ("worker", "ram_total"): count,
                ("worker", "gpus", 0, "vram_used"): count, ("worker", "gpus"): lst, ("worker", "labels"): lst}),
        Target(subjects.worker_heartbeat(worker), {"worker": worker, "gpus": [[0, 0]], "instances": []},
               {("worker",): name, ("gpus", 0, 0): index, ("gpus", 0, 1): count, ("ram_used",): count,
                ("seq",): count, ("instances",): lst}),
        Target(subjects.worker_files(worker), {"worker": worker, "source": model.source, "state": "READY"},
               {("worker",): name, ("state",): enum, ("progress",): frac, ("source",): text}),
        Target(subjects.SYNC, {"by": "fuzz", "worker": worker}, {("worker",): name, ("by",): text}),
        Target(subjects.instance_status(worker), {"instance_id": instance.id, "worker": worker, "state": "RUNNING"},
               {("instance_id",): name, ("worker",): name, ("state",): enum, ("message",): text}, jetstream=True),
        Target(subjects.PLACEMENT_REQUESTED, request,
               {("items", 0, "instance_id"): name, ("items", 0, "model"): name, ("items", 0, "attempt"): count,
                ("specs",): lst, ("items",): lst}, jetstream=True),
        Target(subjects.PLACEMENT_FILTERED, {"request": request, "survivor_sets": [[worker]],
                                             "filtered": {model.name: {"survivors": 0}}},
               {("request", "items", 0, "model"): name, ("request", "items"): lst, ("filtered",): lst,
                ("survivor_sets",): lst}, jetstream=True),
        Target(subjects.PLACEMENT_FITTED, {"request": request, "fitted": {model.name: {"model": model.name}}},
               {("request", "items", 0, "instance_id"): name, ("fitted",): lst, ("request", "batch_id"): text},
               jetstream=True),
        Target(subjects.PLACEMENT_SCORED, {"batch_id": "b", "outcomes": [{"item": item, "decision": decision}]},
               {("outcomes", 0, "decision", "candidate", "vram_claims", 0): count,
                ("outcomes", 0, "decision", "candidate", "gpu_indexes", 0): index,
                ("outcomes", 0, "decision", "candidate", "worker"): name, ("outcomes", 0, "item", "instance_id"): name,
                ("outcomes", 0, "decision", "score"): count, ("outcomes",): lst}, jetstream=True),
        Target(subjects.EVENT_INSTANCE, {"events": [{"instance": inst}]},
               {("events", 0, "instance", "vram_claims"): lst, ("events", 0, "instance", "worker"): name,
                ("events", 0, "instance", "id"): name, ("events", 0, "instance", "state"): enum,
                ("events", 0, "instance", "ram_claim"): count, ("events", 0, "at"): count}),
        Target(subjects.EVENT_INSTANCE_PROGRESS, {"events": [{"instance": inst}]},
               {("events", 0, "instance", "gpu_indexes"): lst, ("events", 0, "instance", "model"): name}),
        Target(subjects.EVENT_CORDON, {"worker": worker, "cordoned": True, "gpu_index": 0},
               {("worker",): name, ("gpu_index",): index}),
        Target(subjects.EVENT_WORKER_REMOVED, {"worker": worker, "reason": "forged"},
               {("worker",): name, ("reason",): text}),
        # A forged announcement of a stored inventory: the base's revision is older than any store, so even its
        # schema-valid variants are ignored by the snapshots (see WorkerRegisteredEvent).
        Target(subjects.EVENT_WORKER_REGISTERED, {**reg, "revision": 1},
               {("worker", "name"): name, ("worker", "gpus", 0, "vram_total"): count,
                ("worker", "gpus", 0, "index"): index, ("worker", "ram_total"): count, ("worker", "gpus"): lst,
                ("revision",): frac}),
        Target(subjects.worker_assign(worker), {"instance_id": instance.id, "model": model.name,
                                                "gpu_indexes": [0], "vram_claims": [GIB]},
               {("vram_claims", 0): count, ("gpu_indexes", 0): index, ("instance_id",): name, ("model",): name,
                ("vram_claims",): lst}),
        Target(subjects.worker_drain(worker), {"instance_id": instance.id}, {("instance_id",): name}),
        Target(subjects.worker_delete(worker), {"instance_id": instance.id}, {("instance_id",): name}),
    ]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = json.loads(json.dumps(doc))  # a deep copy
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _dump(doc: Any) -> bytes:
    # Python's json writes inf/nan as Infinity/NaN: not JSON, which is one more thing to refuse.
    return json.dumps(doc).encode()


def malformed(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid message: noise, cut JSON, wrong shapes, deep nesting, bad UTF-8."""
    raw = _dump(base)
    deep = st.integers(1_500, 6_000).map(lambda n: raw[:-1] + b',"zz":' + b"[" * n + b"]" * n + b"}")
    return st.one_of(
        st.binary(max_size=256),
        st.integers(0, max(0, len(raw) - 1)).map(lambda k: raw[:k]),
        st.sampled_from([b"[]", b'"s"', b"1", b"null", b"{}", b"\xff\xfe{", b'{"v": 99}', b'{"v": -1}']),
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=4).map(_dump),
        deep,
    )


def payloads(target: Target) -> st.SearchStrategy[bytes]:
    """Every hostile payload for one subject: malformed bytes, or the base with one validated field made hostile."""
    paths = sorted(target.fields, key=repr)

    def mutate(path: tuple[Any, ...]) -> st.SearchStrategy[bytes]:
        return hostile(target.fields[path]).map(lambda value: _dump(_set(target.base, path, value)))

    mutated = st.sampled_from(paths).flatmap(mutate)
    return st.one_of(malformed(target.base), mutated, mutated, mutated)


def draw(strategy: st.SearchStrategy[Any], n: int, seed: int) -> list[Any]:
    """``n`` examples of ``strategy``, reproducible from ``seed``."""
    rnd = random.Random(seed)
    try:
        from hypothesis.control import BuildContext
        from hypothesis.errors import StopTest
        from hypothesis.internal.conjecture.data import ConjectureData

        out: list[Any] = []
        while len(out) < n:
            data = ConjectureData(random=rnd)
            with BuildContext(data, is_final=False, wrapped_test=None):  # type: ignore[arg-type]
                try:
                    out.append(data.draw(strategy))
                except StopTest:  # an example the strategy rejected: draw another
                    continue
        return out
    except (ImportError, TypeError):  # the engine's internals moved: the public (slower) way
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [strategy.example() for _ in range(n)]


async def publish_all(nc: Client, target: Target, bodies: Sequence[bytes], tag: str) -> int:
    """Publish every payload on the target's subject (JetStream subjects straight, deduped by a unique id);
    the bytes sent."""
    sent = 0
    for k, body in enumerate(bodies):
        headers = {"Nats-Msg-Id": f"fuzz-{tag}-{k}"} if target.jetstream else None
        await nc.publish(target.subject, body, headers=headers)
        sent += len(body)
        if k % 200 == 199:
            await nc.flush()
    await nc.flush()
    return sent


async def drained(nc: Client, consumers: Sequence[tuple[str, str]], timeout: float) -> bool:
    """Until every durable consumer has nothing pending or unacked (or ``timeout``)."""
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        busy = 0
        for stream, durable in consumers:
            info = await js.consumer_info(stream, durable)
            busy += info.num_pending + info.num_ack_pending
        if not busy:
            return True
        await asyncio.sleep(0.2)
    return False


_LAYOUT = [v for k, v in vars(Keys).items() if not k.startswith("_") and isinstance(v, str)]
KNOWN_KEYS = {v for v in _LAYOUT if not v.endswith(":")}  # the state layer's layout, as declared
KNOWN_PREFIXES = (*(v for v in _LAYOUT if v.endswith(":")), "gantry:tlock:")


async def junk(store: StateStore, workers: set[str], models: set[str]) -> list[str]:
    """Anything stored that the fuzzer could have put there: unknown keys, workers, models, GPUs or cordons,
    records outside the limits, a ledger over capacity or out of step with the instances."""
    r = store.r
    out: list[str] = []
    for raw in await r.keys("gantry:*"):
        key = _text(raw)
        if key not in KNOWN_KEYS and not key.startswith(KNOWN_PREFIXES):
            out.append(f"unknown key {key[:80]!r}")
        elif key.startswith(Keys.model_index) and key[len(Keys.model_index):] not in models:
            out.append(f"index of unknown model {key[:80]!r}")
    for key, allowed in ((Keys.workers, workers), (Keys.seen, workers), (Keys.usage, workers), (Keys.ram_cap, workers),
                         (Keys.models, models), (Keys.desired, models)):
        names = {_text(k) for k in await r.hkeys(key)}
        out += [f"{key}: unknown {n[:80]!r}" for n in sorted(names - allowed)]
    inventory = {w.name: {g.index for g in w.gpus} for w in await store.workers()}
    gpus = {f"{w}:{i}" for w, idx in inventory.items() for i in idx}
    for key in (Keys.gpu_cap, Keys.gpu_used):
        out += [f"{key}: unknown GPU {f[:80]!r}" for f in sorted({_text(k) for k in await r.hkeys(key)} - gpus)]
    cordons = await store.cordons()
    out += [f"cordon of unknown {c[:80]!r}" for c in sorted(cordons - workers - gpus)]
    for f in await store.model_files():
        if f.worker not in workers:
            out.append(f"model file from unknown worker {f.worker[:80]!r}")
    if len(await store.workers()) != await r.hlen(Keys.workers):
        out.append("a stored worker is outside the limits")
    if len(await store.instances()) != await r.hlen(Keys.inst):
        out.append("a stored instance is outside the limits")
    ids = {_text(k) for k in await r.hkeys(Keys.inst)}
    for key, allowed in ((Keys.retries, ids), (Keys.failures, ids), (Keys.restarts, models)):
        out += [f"{key}: unknown {n[:80]!r}" for n in sorted({_text(k) for k in await r.hkeys(key)} - allowed)]
    for inst in await store.instances():
        if inst.model not in models or (inst.worker is not None and inst.worker not in workers):
            out.append(f"instance {inst.id[:80]!r} of unknown model or worker")
    out += await store.overbooked()
    out += await store.claims_consistent()
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def cpu_share(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU used by each process over ``seconds`` (1.0 = one core busy)."""
    import time

    import psutil  # type: ignore[import-untyped]

    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    time.sleep(seconds)
    return {name: round((sum(p.cpu_times()[:2]) - before[name]) / seconds, 3) for name, p in procs.items()}

