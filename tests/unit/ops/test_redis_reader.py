"""The CLI's blocking read-only Redis connection (ops.cli.redis_reader) on a real redis-server with auth: the state
layer's reads through it give exactly what they give through redis-py, and whatever it cannot do it refuses
(so the read commands read through redis-py instead) rather than answering differently."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ops.cli.client import read_snapshot, require_model
from ops.cli.errors import CliError
from ops.cli.redis_reader import ReaderFailed, RedisReader, run
from ops.servers import ServerProcess, free_port
from shared.core.placement.domain import GIB, Gpu, GpuUsage, Instance, InstanceState, ModelSpec, Worker, WorkerUsage
from shared.envsettings import EnvSettings
from shared.state import CommitItem, StateStore
from shared.state.store import Keys

DB = 5
NOW = 1_000_000.0
SETTINGS = EnvSettings()
MODELS = ("m", "n")


def db_url(server: ServerProcess, db: int = DB) -> str:
    return server.url.rsplit("/", 1)[0] + f"/{db}"


def worker(name: str) -> Worker:
    return Worker(name=name, gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(4)), ram_total=64 * GIB,
                  labels={"zone": "a", "ünïcode": "ja"})


async def seed(store: StateStore, replicas: int) -> None:
    """Workers with heartbeats and cordons, two models, replicas in several states with awkward reasons."""
    await store.register_workers([worker("w0"), worker("w1"), worker("w2")], seen_at=NOW - 1)
    usage = WorkerUsage(worker="w1", ram_used=GIB, gpus=(GpuUsage(index=0, vram_used=GIB),))
    await store.record_heartbeats([(usage, NOW - 20)])
    await store.set_cordon("w2", True)
    await store.set_cordon("w0", True, 3)
    for model in MODELS:
        await store.set_model(ModelSpec(name=model, source="org/x", replicas=replicas), model, replicas)
        token = await store.lock_model(model)
        assert token
        await store.create_pending(model, token, [Instance(id=f"{model}-{i:04d}", model=model)
                                                  for i in range(replicas)])
        await store.unlock_model(model, token)
    placed = Instance(id="m-0000", model="m", state=InstanceState.SCHEDULED, worker="w0", gpu_indexes=(0, 1),
                      vram_claims=(40 * GIB, 40 * GIB))
    assert await store.commit([CommitItem(placed)]) == ["ok"]
    await store.set_reasons({"m-0001": "no GPU: w0 full\r\n*3\r\n$-1 (not a reply)", "n-0002": "ünïcode 理由"})


@pytest.fixture
async def store(redis_server: ServerProcess) -> AsyncIterator[StateStore]:
    """Seeded state in database DB of the session's Redis (the admin's URL)."""
    st = StateStore.from_url(db_url(redis_server))
    await st.r.flushdb()
    await seed(st, replicas=300)  # 600 instances: replies larger than one socket read
    yield st
    await st.close()


@pytest.fixture
def reader(redis_server: ServerProcess) -> Iterator[RedisReader]:
    connection = RedisReader.connect(db_url(redis_server), 2.0, 5.0)
    yield connection
    connection.close()


@pytest.mark.parametrize("model", [None, "m", "n"])
async def test_a_snapshot_read_through_it_is_the_one_redis_py_reads(
    store: StateStore, reader: RedisReader, model: str | None
) -> None:
    theirs = await read_snapshot(store.r, SETTINGS, model, now=NOW)
    mine = run(read_snapshot(reader, SETTINGS, model, now=NOW))
    assert mine == theirs
    assert len(mine.instances) == (600 if model is None else 300) and len(mine.workers) == 3
    assert {s.value for s in mine.worker_states.values()} == {"READY", "NOT_READY", "MAINTENANCE"}
    reasons = {i.reason for i in mine.instances if i.reason}
    assert len(reasons) == (2 if model is None else 1)  # the CRLF and RESP-looking one, the non-ASCII one


async def test_an_unknown_model_is_the_same_error(store: StateStore, reader: RedisReader) -> None:
    with pytest.raises(CliError) as theirs:
        await require_model(store.r, "nope")
    with pytest.raises(CliError) as mine:
        run(require_model(reader, "nope"))
    assert str(mine.value) == str(theirs.value) and "known: m, n" in str(mine.value)


async def test_it_reads_the_database_its_url_names(store: StateStore, redis_server: ServerProcess) -> None:
    other = RedisReader.connect(db_url(redis_server, 0 if DB else 1), 2.0, 5.0)
    try:
        assert run(read_snapshot(other, SETTINGS, "m", now=NOW)).instances == ()
    finally:
        other.close()


def test_a_wrong_password_is_refused(redis_server: ServerProcess) -> None:
    url = db_url(redis_server)
    scheme, rest = url.split("://", 1)
    user = rest.split(":", 1)[0]
    with pytest.raises(ReaderFailed):
        RedisReader.connect(f"{scheme}://{user}:wrong@{rest.rsplit('@', 1)[1]}", 2.0, 5.0)


@pytest.mark.parametrize("url", [
    "rediss://127.0.0.1:6379/0", "unix:///tmp/redis.sock", "redis://127.0.0.1:6379/0?protocol=3",
    "redis://user@127.0.0.1:6379/0", "redis://127.0.0.1:6379/x", "redis://127.0.0.1:99999/0", "notaurl",
    "redis:///0",
])
def test_anything_but_a_plain_redis_url_is_left_to_redis_py(url: str) -> None:
    with pytest.raises(ReaderFailed):
        RedisReader.connect(url, 2.0, 5.0)


def test_nothing_listening_is_left_to_redis_py() -> None:
    with pytest.raises(ReaderFailed):
        RedisReader.connect(f"redis://127.0.0.1:{free_port()}/0", 2.0, 5.0)


async def test_it_runs_no_script(store: StateStore, reader: RedisReader) -> None:
    with pytest.raises(ReaderFailed):
        run(StateStore(reader).release(["m-0000"]))  # type: ignore[arg-type]
    assert (await store.states(["m-0000"])) == {"m-0000": InstanceState.SCHEDULED}


async def test_an_error_reply_is_left_to_redis_py(store: StateStore, reader: RedisReader) -> None:
    await store.r.set(Keys.inst + "-not-a-hash", "x")
    with pytest.raises(ReaderFailed):
        reader.call(("HGETALL", Keys.inst + "-not-a-hash"))  # WRONGTYPE


def test_a_call_it_does_not_offer_is_left_to_redis_py(reader: RedisReader) -> None:
    with pytest.raises(ReaderFailed):
        reader.hkeys("k")
    with pytest.raises(ReaderFailed):
        reader.pipeline(transaction=False).hkeys("k")
    assert not hasattr(reader, "__wrapped__")


def test_a_read_that_waits_on_anything_else_is_refused() -> None:
    async def suspends() -> None:
        import asyncio

        await asyncio.sleep(0)

    with pytest.raises(ReaderFailed):
        run(suspends())


def test_a_redis_that_takes_the_connection_but_never_answers_is_given_up_once_not_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the reader timed out, then redis-py waited as long again: 10 s for one line
    import socket
    import time

    from ops.cli import reads
    from ops.cli.errors import CliError
    from shared.settings import Settings

    monkeypatch.setattr(reads, "CONNECT_TIMEOUT_S", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        t0 = time.monotonic()
        with pytest.raises(CliError, match=r"cannot reach Redis .*no answer in time"):
            reads.read_cluster(Settings(redis_url=url))
        assert time.monotonic() - t0 < 5.0  # the reader's one wait (3.3 s here), not redis-py's after it
