"""The NATS picker end to end: the service process (``python -m services.picker``, as the ``picker`` identity
with its least-privilege rights) on a real nats-server, engine reports and KV events published on the engines'
subjects, picks asked by request/reply. Picks follow the KV events; bad requests are dead-lettered and answered
with an error while the service keeps answering."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.servers import ServerProcess, stop_processes
from shared.bus import subjects
from shared.bus.messages import (
    EngineKVEvents,
    EngineMetrics,
    ErrorEvent,
    PickItem,
    PickProgress,
    PickReply,
    PickRequest,
    decode,
    encode,
)
from shared.core.kv_events import BlockStored, KVEventBatch, chain_hashes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
MODEL = "pick-model"
ENGINES = ("pick-model-e0", "pick-model-e1", "pick-model-e2")


@pytest.fixture(scope="module")
def picker(nats_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """One picker process for the module: every bad input below hits the same service, which must survive all."""
    assert nats_server.credentials is not None
    url = nats_server.credentials.url(nats_server.url, "picker")
    log = tmp_path_factory.mktemp("picker") / "picker.log"
    with running_picker({"GANTRY_NATS_URL": url}, log) as proc:
        yield proc
    print(log.read_text()[-3000:])


@contextlib.contextmanager
def running_picker(env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m services.picker ARGS`` with ``env`` added, its output in ``log``; stopped on the way out."""
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "services.picker", *args], cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        yield proc
    finally:
        stop_processes([proc], grace_s=10)


def metrics(instance: str, i: int, model: str = MODEL) -> EngineMetrics:
    port = 18000 + i if model == MODEL else 18100 + i
    return EngineMetrics(instance_id=instance, model=model, url=f"http://127.0.0.1:{port}", ts=time.time(),
                         num_requests_running=2, num_requests_waiting=0, kv_cache_usage_perc=0.1, block_size=16,
                         num_gpu_blocks=4000)


@contextlib.asynccontextmanager
async def engines(nc: Client, model: str = MODEL, instances: tuple[str, ...] = ENGINES) -> AsyncIterator[None]:
    """The three engines report every 50 ms, as model servers do."""

    async def report() -> None:
        while True:
            for i, inst in enumerate(instances):
                await nc.publish(subjects.engine_metrics(inst), encode(metrics(inst, i, model)))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def pick(nc: Client, payload: bytes, timeout: float = 15.0) -> PickReply:
    reply = await nc.request(subjects.PICK, payload, timeout=timeout)
    return decode(reply.data, PickReply)


async def until_pool_ready(nc: Client) -> None:
    """Until the picker has heard every engine (its first reports): its fallback list (3 long) names all three.
    Picks answer 503 before the first report; a fixed wait after the first answer did not cover a loaded host."""
    deadline = time.monotonic() + 30
    n = 0
    while True:
        n += 1
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
            probe = PickItem(request_id=f"probe-{n}", model=MODEL, token_ids=[1])
            r = await pick(nc, encode(PickRequest(picks=[probe])), timeout=2)
            if r.answers and r.answers[0].code == 200:
                await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=[probe.request_id])))
                if set(r.answers[0].endpoints) == set(ENGINES):
                    return
        assert time.monotonic() < deadline, "the picker never heard every engine"
        await asyncio.sleep(0.1)


SENTINEL = [5_000_000 + t for t in range(64)]  # a prefix no test request shares


async def until_kv_events_read(nc: Client) -> None:
    """Until the picker has read the KV events announced so far: they arrive in order on one subscription, so once
    a last one (``SENTINEL`` on the third engine) steers a pick, the earlier ones are applied too. (A fixed wait
    did not cover a loaded host; probing with the tested prompts themselves could teach the picker a wrong place.)"""
    await announce(nc, ENGINES[0], 0, SENTINEL)
    deadline = time.monotonic() + 30
    n = 0
    while True:
        n += 1
        probe = PickItem(request_id=f"sentinel-{n}", model=MODEL, token_ids=SENTINEL)
        r = await pick(nc, encode(PickRequest(picks=[probe])))
        await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=[probe.request_id])))
        if r.answers and r.answers[0].endpoints[:1] == [ENGINES[0]]:
            return
        assert time.monotonic() < deadline, f"the picker never followed the sentinel's KV events: {r}"
        await asyncio.sleep(0.1)


async def announce(nc: Client, instance: str, seq: int, tokens: list[int]) -> None:
    batch = KVEventBatch(ts=time.time(), events=[BlockStored(chain_hashes(tokens, 16), None, tokens, 16)])
    await nc.publish(subjects.engine_kv_events(instance),
                     encode(EngineKVEvents(instance_id=instance, model=MODEL, seq=seq, batch=batch)))
    await nc.flush()


def test_a_request_lands_where_kv_events_announced_its_prefix(nats_server: ServerProcess,
                                                               picker: subprocess.Popen[bytes]) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        async with engines(nc):
            await until_pool_ready(nc)
            prompts = {inst: [7_000 * (k + 1) + t for t in range(640)] for k, inst in enumerate(ENGINES)}
            for inst in ("pick-model-e2", "pick-model-e1"):
                await announce(nc, inst, 0, prompts[inst])
            await until_kv_events_read(nc)
            for round_ in range(3):  # several times: the assumed state of earlier picks must not move it
                for inst in ("pick-model-e2", "pick-model-e1"):
                    tail = [900_000 + round_ * 100 + t for t in range(32)]
                    item = PickItem(request_id=f"r-{inst}-{round_}", model=MODEL, token_ids=prompts[inst] + tail)
                    r = await pick(nc, encode(PickRequest(picks=[item])))
                    assert r.error == ""
                    assert r.answers[0].endpoints[0] == inst, r.answers
                    assert r.answers[0].addresses[0] == f"127.0.0.1:{18000 + ENGINES.index(inst)}"
            # several requests in one message: answers in order
            items = [PickItem(request_id=f"m-{inst}", model=MODEL, token_ids=prompts[inst])
                     for inst in ("pick-model-e1", "pick-model-e2")]
            r = await pick(nc, encode(PickRequest(picks=items)))
            assert [a.request_id for a in r.answers] == ["m-pick-model-e1", "m-pick-model-e2"]
            assert [a.endpoints[0] for a in r.answers] == ["pick-model-e1", "pick-model-e2"]
            # an unknown model is refused with a reason, not dropped
            r = await pick(nc, encode(PickRequest(picks=[PickItem(request_id="x", model="other", token_ids=[1])])))
            assert r.answers[0].code == 503 and "other" in r.answers[0].reason
        await nc.drain()

    asyncio.run(main())
    assert picker.poll() is None


@pytest.mark.parametrize("payload", [
    b"not json",
    b"{}",
    b'{"picks": []}',
    b'{"picks": 5}',
    b"[" * 100_000,
])
def test_a_bad_request_is_dead_lettered_and_answered_and_the_service_keeps_picking(
        nats_server: ServerProcess, picker: subprocess.Popen[bytes], payload: bytes) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        dead: asyncio.Queue[ErrorEvent] = asyncio.Queue()

        async def on_dead(msg: Msg) -> None:
            await dead.put(decode(msg.data, ErrorEvent))

        await nc.subscribe(subjects.dead_letter("picker"), cb=on_dead)
        async with engines(nc):
            await until_pool_ready(nc)
            r = await pick(nc, payload)
            assert r.error and not r.answers
            ev = await asyncio.wait_for(dead.get(), 15)
            assert ev.service == "picker" and ev.subject == subjects.PICK and ev.reason
            await nc.publish(subjects.PICK, payload)  # without a reply inbox too
            ev = await asyncio.wait_for(dead.get(), 15)
            r = await pick(nc, encode(PickRequest(picks=[PickItem(request_id="after", model=MODEL, token_ids=[5])])))
            assert r.answers[0].code == 200
        await nc.drain()

    asyncio.run(main())
    assert picker.poll() is None


@pytest.mark.parametrize("bad", [
    {"request_id": "bad", "model": MODEL, "token_ids": [-1, 2]},
    {"request_id": "", "model": MODEL},
    {"request_id": "bad", "model": "../etc", "token_ids": [1]},
    {"request_id": "bad", "model": MODEL, "token_ids": "x" * 100},
    "not an item",
])
def test_a_bad_item_is_answered_400_and_dead_lettered_and_the_valid_items_beside_it_are_picked(
        nats_server: ServerProcess, picker: subprocess.Popen[bytes], bad: object) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        dead = await nc.subscribe(subjects.dead_letter("picker"))
        async with engines(nc):
            await until_pool_ready(nc)
            good = [{"request_id": f"ok-{i}", "model": MODEL, "token_ids": [i, 1, 2]} for i in range(2)]
            r = await pick(nc, msgspec.json.encode({"picks": [good[0], bad, good[1]]}))
            assert not r.error
            assert [(a.request_id, a.code) for a in r.answers] == [("ok-0", 200), ("", 400), ("ok-1", 200)]
            assert r.answers[1].reason and r.answers[0].endpoints and r.answers[2].endpoints
            ev = decode((await dead.next_msg(timeout=15)).data, ErrorEvent)
            assert ev.subject == subjects.PICK and "1 of 3 picks invalid; item 1" in ev.reason
            await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=["ok-0", "ok-1"])))
        await nc.drain()

    asyncio.run(main())
    assert picker.poll() is None


PLACED_DB = 13  # this test's own database: the picker reads every instance stored there


def test_with_the_pool_from_placement_a_draining_instance_is_picked_no_more(
        nats_server: ServerProcess, redis_server: ServerProcess, tmp_path: Path) -> None:
    import redis

    from shared.bus.messages import InstanceEvent, InstanceEvents
    from shared.core.placement.domain import Instance, InstanceState
    from shared.state.store import Keys

    creds = nats_server.credentials
    assert creds is not None
    def url(identity: str) -> str:  # the server's URL names database 0
        return creds.url(redis_server.url, identity).rsplit("/", 1)[0] + f"/{PLACED_DB}"

    admin = redis.Redis.from_url(url("admin"))
    admin.flushdb()
    placed = {inst: Instance(id=inst, model=MODEL, state=InstanceState.RUNNING, worker="w1") for inst in ENGINES}
    admin.hset(Keys.inst, mapping={i: msgspec.json.encode(v) for i, v in placed.items()})
    admin.hset(Keys.inst_state, mapping={i: "RUNNING" for i in ENGINES[:2]})  # the third never placed RUNNING
    admin.hset(Keys.inst_state, ENGINES[2], "PENDING")
    env = {"GANTRY_NATS_URL": creds.url(nats_server.url, "picker"), "GANTRY_REDIS_URL": url("picker")}
    log = tmp_path / "picker.log"

    async def endpoints(nc: Client, n: int) -> list[str]:
        item = PickItem(request_id=f"placed-{n}", model=MODEL, token_ids=[1, 2, 3])
        try:
            r = await pick(nc, encode(PickRequest(picks=[item])), timeout=2)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):  # still starting
            return []
        await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=[item.request_id])))
        return sorted(r.answers[0].endpoints) if r.answers and r.answers[0].code == 200 else []

    async def until(nc: Client, want: list[str]) -> None:
        deadline = time.monotonic() + 30
        n = 0
        while (got := await endpoints(nc, n)) != want:
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"picked among {got}, wanted {want}\n{log.read_text()[-2000:]}")
            n += 1
            await asyncio.sleep(0.1)

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        async with engines(nc):
            await until(nc, sorted(ENGINES[:2]))  # every engine reports; only RUNNING instances are picked
            drained = msgspec.structs.replace(placed[ENGINES[0]], state=InstanceState.DRAINING)
            admin.hset(Keys.inst_state, ENGINES[0], "DRAINING")  # as the reconciler: the store, then the event
            await nc.publish(subjects.EVENT_INSTANCE, encode(InstanceEvents(events=(InstanceEvent(instance=drained),))))
            await until(nc, [ENGINES[1]])
        await nc.drain()

    try:
        with running_picker(env, log, "--pool-source", "placement") as proc:
            asyncio.run(main())
            assert proc.poll() is None
    finally:
        admin.flushdb()
        admin.close()


SHARING_MODEL = "share-model"  # its own engines: the failures below leave one out at the module's picker too
SHARING = ("share-model-e0", "share-model-e1", "share-model-e2")


def test_three_failures_at_any_replicas_leave_the_engine_out_at_every_replica(
        nats_server: ServerProcess, tmp_path: Path) -> None:
    # A request's failure reaches every replica (PickProgress), but only the one that placed it knows where it went:
    # without sharing, each replica would need three failures of its own before it left the engine out.
    assert nats_server.credentials is not None
    env = {"GANTRY_NATS_URL": nats_server.credentials.url(nats_server.url, "picker")}

    async def one_pick(nc: Client, rid: str, tokens: list[int]) -> list[str]:
        r = await pick(nc, encode(PickRequest(picks=[PickItem(request_id=rid, model=SHARING_MODEL,
                                                              token_ids=tokens)])))
        assert r.answers and r.answers[0].code == 200, r
        return r.answers[0].endpoints

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        async with engines(nc, SHARING_MODEL, SHARING):
            ready = 0
            for n in range(600):  # every replica has heard every engine: 30 picks in a row name all three
                with contextlib.suppress(AssertionError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    ready = ready + 1 if set(await one_pick(nc, f"probe-{n}", [n])) == set(SHARING) else 0
                await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=[f"probe-{n}"])))
                if ready == 30:
                    break
                await asyncio.sleep(0.02)
            assert ready == 30, "the replicas never heard every engine"
            failed = 0
            for n in range(300):  # requests that landed on e0 fail, wherever they were placed
                rid = f"try-{n}"
                first = (await one_pick(nc, rid, [10_000 + n, n]))[0]
                progress = PickProgress(failed=[rid]) if first == SHARING[0] else PickProgress(finished=[rid])
                await nc.publish(subjects.PICK_PROGRESS, encode(progress))
                failed += first == SHARING[0]
                if failed == 3:
                    break
            assert failed == 3, "e0 was never picked"
            await nc.flush()
            await asyncio.sleep(2.0)  # the placing replicas tell the others within 50 ms and a NATS hop
            landed = []
            for n in range(40):
                landed.append(await one_pick(nc, f"after-{n}", [20_000 + n, n]))
                await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=[f"after-{n}"])))
            assert not [eps for eps in landed if SHARING[0] in eps], landed
        await nc.drain()

    try:
        with running_picker(env, tmp_path / "a.log") as a, running_picker(env, tmp_path / "b.log") as b:
            asyncio.run(main())
            assert a.poll() is None and b.poll() is None
    finally:
        for log in ("a.log", "b.log"):
            print(f"==== {log}\n{(tmp_path / log).read_text(errors='replace')[-3000:]}")


JOIN_MODEL = "join-model"  # its own engines: nothing else in the module routes on them
JOINING = ("join-model-e0", "join-model-e1", "join-model-e2")


def test_a_replica_started_while_picks_flow_refuses_none_of_them(picker: subprocess.Popen[bytes],
                                                                  nats_server: ServerProcess, tmp_path: Path) -> None:
    """A replica joins the pick queue group only once it has heard the engines: joining at once, it took its share of
    picks and refused them 503 ("no endpoint serves model") while the module's picker could route them."""
    assert nats_server.credentials is not None
    env = {"GANTRY_NATS_URL": nats_server.credentials.url(nats_server.url, "picker")}

    async def main() -> list[int]:
        nc = await nats.connect(nats_server.url)
        codes: list[int] = []
        async with engines(nc, JOIN_MODEL, JOINING):
            for _ in range(500):  # until the module's picker has heard them and answers
                with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    probe = PickRequest(picks=[PickItem(request_id="warm", model=JOIN_MODEL, token_ids=[1])])
                    if (await pick(nc, encode(probe), timeout=2)).answers[0].code == 200:
                        break
                await asyncio.sleep(0.02)
            await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=["warm"])))
            n = 0
            deadline = time.monotonic() + 6  # past the new replica's start and its longest wait to join
            while time.monotonic() < deadline:
                batch = [pick(nc, encode(PickRequest(picks=[PickItem(request_id=f"j{n}-{k}", model=JOIN_MODEL,
                                                                     token_ids=[n, k])]))) for k in range(8)]
                for reply in await asyncio.gather(*batch):
                    codes.extend(a.code for a in reply.answers)
                await nc.publish(subjects.PICK_PROGRESS,
                                 encode(PickProgress(finished=[f"j{n}-{k}" for k in range(8)])))
                n += 1
        await nc.drain()
        return codes

    log = tmp_path / "joining.log"
    with running_picker(env, log) as joining:  # starting (imports, connecting) while the picks below flow
        codes = asyncio.run(main())
        text = log.read_text()
        assert joining.poll() is None and "gantry picker on" in text, text[-2000:]  # it did join, mid-run
    assert len(codes) > 100 and set(codes) == {200}, sorted(set(codes))


LATE_MODEL = "late-model"  # its own engines: the failures below leave one out at the module's picker too
LATE = ("late-model-e0", "late-model-e1", "late-model-e2")


def test_a_replica_started_after_an_engine_broke_never_picks_it(picker: subprocess.Popen[bytes],
                                                               nats_server: ServerProcess, tmp_path: Path) -> None:
    """A replica joins only once it has listened to its peers for a digest period: joining as soon as it had heard the
    engines, it answered picks before the module's picker named the broken engine, and listed it."""
    assert nats_server.credentials is not None
    env = {"GANTRY_NATS_URL": nats_server.credentials.url(nats_server.url, "picker")}

    async def one_pick(nc: Client, rid: str, tokens: list[int]) -> list[str]:
        r = await pick(nc, encode(PickRequest(picks=[PickItem(request_id=rid, model=LATE_MODEL, token_ids=tokens)])))
        assert r.answers and r.answers[0].code == 200, r
        await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=[rid])))
        return r.answers[0].endpoints

    async def break_e0(nc: Client) -> None:
        """Three requests placed on e0 by the module's picker (the only replica) fail."""
        for n in range(600):  # until it has heard every engine
            with contextlib.suppress(AssertionError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if set(await one_pick(nc, f"late-probe-{n}", [n])) == set(LATE):
                    break
            await asyncio.sleep(0.02)
        failed = 0
        for n in range(300):
            rid = f"late-try-{n}"
            r = await pick(nc, encode(PickRequest(picks=[PickItem(request_id=rid, model=LATE_MODEL,
                                                                  token_ids=[30_000 + n, n])])))
            on_e0 = r.answers[0].endpoints[0] == LATE[0]
            await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(failed=[rid]) if on_e0
                                                            else PickProgress(finished=[rid])))
            failed += on_e0
            if failed == 3:
                return
        raise AssertionError("e0 was never picked")

    log = tmp_path / "late.log"

    async def main() -> list[list[str]]:
        nc = await nats.connect(nats_server.url)
        async with engines(nc, LATE_MODEL, LATE):
            await break_e0(nc)
            with running_picker(env, log) as late:
                while "gantry picker on" not in log.read_text():  # it joined the queue group
                    assert late.poll() is None, log.read_text()[-2000:]
                    await asyncio.sleep(0.02)
                landed = [await one_pick(nc, f"late-after-{n}", [40_000 + n, n]) for n in range(40)]
        await nc.drain()
        return landed

    landed = asyncio.run(main())
    assert not [eps for eps in landed if LATE[0] in eps], landed
