"""Scripts over the lean connection answer and fail as through redis-py, on the session's real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from ops.auth import Credentials
from ops.servers import ServerProcess
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, Worker
from shared.state import CommitItem, StateStore
from shared.state.lean import ScriptConnection

from .relay import Relay

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]), {ARGV[3]}, false}"


def _db(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/3"


@pytest.fixture
async def pair(redis_server: ServerProcess) -> AsyncIterator[tuple[ScriptConnection, aioredis.Redis]]:
    """A lean connection and a redis-py client, as the same identity on the same database."""
    lean = ScriptConnection.from_url(_db(redis_server.url))
    assert lean is not None
    client = aioredis.from_url(_db(redis_server.url))
    yield lean, client
    await lean.close()
    await client.aclose()


async def test_a_script_answers_what_redis_py_answers(pair: tuple[ScriptConnection, aioredis.Redis]) -> None:
    lean, client = pair
    args: list[Any] = ["k", "ünï\x00", 42, 0.5]
    assert await lean.script(ECHO)(keys=args[:1], args=args[1:]) == await client.register_script(ECHO)(
        keys=args[:1], args=args[1:]
    )


async def test_a_script_the_server_forgot_is_loaded_again(pair: tuple[ScriptConnection, aioredis.Redis]) -> None:
    lean, client = pair
    script = lean.script("return 'again'")
    assert await script() == b"again"
    await client.script_flush()
    assert await script() == b"again"


@pytest.mark.parametrize("reply", ["BUSY not now", "ERR plain", "NOSUCH thing"])
async def test_an_error_reply_is_raised_as_redis_py_raises_it(
    pair: tuple[ScriptConnection, aioredis.Redis], reply: str
) -> None:
    lean, client = pair
    text = f"return redis.error_reply('{reply}')"
    with pytest.raises(ResponseError) as theirs:
        await client.register_script(text)()
    with pytest.raises(ResponseError) as ours:
        await lean.script(text)()
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


async def test_the_urls_identity_is_who_runs_the_script(redis_server: ServerProcess, credentials: Credentials) -> None:
    reader = ScriptConnection.from_url(_db(credentials.url(redis_server.url, "scoring")))
    assert reader is not None
    with pytest.raises(NoPermissionError):  # a reader may not run scripts
        await reader.script("return 1")()
    await reader.close()
    writer = ScriptConnection.from_url(_db(credentials.url(redis_server.url, "reconciler")))
    assert writer is not None
    assert await writer.script("return 1")() == 1
    await writer.close()


async def test_a_wrong_secret_is_refused_at_once(redis_server: ServerProcess) -> None:
    wrong = ScriptConnection.from_url(_db(redis_server.url.replace("@", "x@", 1)))
    assert wrong is not None
    with pytest.raises(AuthenticationError):
        await asyncio.wait_for(wrong.script("return 1")(), 2.0)


async def test_a_killed_connection_is_replaced_by_the_next_call(
    pair: tuple[ScriptConnection, aioredis.Redis],
) -> None:
    lean, client = pair
    assert await lean.script("return 1")() == 1
    await client.execute_command("CLIENT", "KILL", "USER", "admin", "SKIPME", "yes")
    assert await lean.script("return 2")() == 2


async def test_a_cancelled_call_leaves_the_next_reply_to_its_own_caller(
    pair: tuple[ScriptConnection, aioredis.Redis],
) -> None:
    lean, _ = pair
    slow = lean.script("local t = redis.call('TIME'); while true do local n = redis.call('TIME');"
                       " if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 50000 then return 'slow' end end")
    call = asyncio.ensure_future(slow())
    await asyncio.sleep(0.01)
    call.cancel()
    answers = await asyncio.gather(lean.script("return 'a'")(), lean.script("return 'b'")())
    assert answers == [b"a", b"b"]


async def test_concurrent_calls_each_get_their_own_reply(pair: tuple[ScriptConnection, aioredis.Redis]) -> None:
    lean, _ = pair
    script = lean.script("return ARGV[1]")
    got = await asyncio.gather(*(script(args=[str(n)]) for n in range(200)))
    assert got == [str(n).encode() for n in range(200)]


@pytest.mark.parametrize(
    "url", ["rediss://h:1/0", "redis://h:1/0?socket_timeout=1", "redis://user@h:1/0", "unix://h/tmp/r.sock"]
)
def test_urls_it_does_not_speak_keep_redis_pys_scripts(url: str) -> None:
    assert StateStore.from_url(url).scripts is None


def test_an_unknown_scheme_is_not_spoken() -> None:
    assert ScriptConnection.from_url("http://h/") is None


def test_plain_and_unix_urls_get_the_lean_connection() -> None:
    for url in ("redis://u:p@h:1/2", "redis://h", "unix:///tmp/redis.sock"):
        assert StateStore.from_url(url).scripts is not None


@pytest.fixture
async def relayed(redis_server: ServerProcess) -> AsyncIterator[tuple[Relay, ScriptConnection, StateStore]]:
    """A store whose scripts go through the relay on a lean connection with a 0.3 s reply timeout."""
    url = urlsplit(_db(redis_server.url))
    assert url.hostname and url.port
    relay = Relay(url.hostname, url.port)
    port = await relay.start()
    lean = ScriptConnection(host="127.0.0.1", port=port, user=url.username, password=url.password, db=3,
                            timeout=0.3)
    store = StateStore(aioredis.from_url(_db(redis_server.url)), lean)
    await store.r.flushdb()
    yield relay, lean, store
    await store.close()
    await relay.close()


async def test_a_commit_whose_reply_was_lost_is_replayed_to_the_same_verdict(
    relayed: tuple[Relay, ScriptConnection, StateStore],
) -> None:
    relay, _, store = relayed
    await store.register_workers([Worker(name="w1", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=GIB)])
    token = await store.lock_model("m")
    assert token
    await store.create_pending("m", token, [Instance(id="a", model="m")])
    item = CommitItem(Instance(id="a", model="m", state=InstanceState.SCHEDULED, worker="w1", gpu_indexes=(0,),
                               vram_claims=(GIB,)))
    gone = CommitItem(msgspec.structs.replace(item.instance, id="z"))
    assert await store.commit([gone]) == ["gone"]  # the script is loaded now: the cut cannot fall on NOSCRIPT
    relay.cuts = 1  # the commit runs; its reply is lost with the connection; the client sends it again
    assert await store.commit([item]) == ["ok"]
    assert relay.connections == 2 and not relay.cuts  # it did run twice: once cut, once answered
    assert await store.ledger() == {"w1:0": (GIB, 80 * GIB)}


async def test_a_reply_later_than_the_timeout_fails_its_connection_and_never_reaches_the_next_caller(
    relayed: tuple[Relay, ScriptConnection, StateStore],
) -> None:
    relay, lean, _ = relayed
    echo = lean.script("return ARGV[1]")
    assert await echo(args=["warm"]) == b"warm"
    relay.hold, relay.held = 0.6, relay.connections  # this connection's replies come after the 0.3 s timeout
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.ensure_future(echo(args=["a"]))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(echo(args=["b"]))  # pipelined behind the late reply on the same connection
    assert await asyncio.gather(first, second) == [b"a", b"b"]  # each its own, retried on a new connection
    relay.hold = 0.0
    assert loop.time() - started < 0.6 and relay.connections == 2  # timed out, not answered late
    await asyncio.sleep(0.4)  # the held replies arrive now, on a connection nobody reads any more
    assert await asyncio.gather(echo(args=["c"]), echo(args=["d"])) == [b"c", b"d"]


async def test_a_server_still_loading_its_data_is_asked_again(pair: tuple[ScriptConnection, aioredis.Redis]) -> None:
    lean, client = pair
    await client.delete("loading-asked")
    loading_once = lean.script("if redis.call('INCR', KEYS[1]) == 1 then"
                               " return redis.error_reply('LOADING Redis is loading the dataset in memory') end"
                               " return 'loaded'")
    assert await loading_once(keys=["loading-asked"]) == b"loaded"  # as redis-py: LOADING is retried
