"""Scripts over the lean connection answer and fail as through redis-py, on the session's real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from ops.auth import Credentials
from ops.servers import ServerProcess
from shared.state import StateStore
from shared.state.lean import ScriptConnection

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
