"""Commands packed by hiredis are byte for byte what redis-py's own asyncio packer sends."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from shared.state import StateStore
from shared.state.resp import fast_packing

CASES: list[tuple[Any, ...]] = [
    ("GET", "k"),
    ("EVALSHA", "ab12", 2, "k1", b"k2", 0, -7, 2**62, "ünïcode", b"\x00\xffbin", ""),
    ("HSET", "h", *[x for n in range(500) for x in (f"field{n}", n * 1_000_000_007)]),
    ("CONFIG GET", "maxmemory"),  # several words in the first argument
    (b"CLIENT SETNAME", "gantry"),
    ("SET", "k", 0.1),  # a float: redis-py's own packer (repr)
    ("SET", "k", 1e300),
    ("SET", "k", memoryview(b"view")),
]


def _pair() -> tuple[Any, Any]:
    plain = aioredis.Redis().connection_pool.make_connection()
    fast = fast_packing(aioredis.Redis()).connection_pool.make_connection()
    return plain, fast


@pytest.mark.parametrize("args", CASES, ids=lambda a: str(a[0]))
def test_hiredis_packing_sends_the_bytes_redis_py_sends(args: tuple[Any, ...]) -> None:
    plain, fast = _pair()
    assert b"".join(fast.pack_command(*args)) == b"".join(bytes(p) for p in plain.pack_command(*args))


@pytest.mark.parametrize("bad", [True, None, object(), 1 + 2j])
def test_an_argument_redis_py_refuses_is_refused_the_same_way(bad: object) -> None:
    plain, fast = _pair()
    with pytest.raises(DataError):
        plain.pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", bad)


def test_ssl_and_unix_urls_keep_their_connection_kind() -> None:
    for url, kind in (("rediss://h:1/0", "SSLConnection"), ("unix:///tmp/r.sock", "UnixDomainSocketConnection"),
                      ("redis://h:1/0", "Connection")):
        store = StateStore.from_url(url)
        cls = store.r.connection_pool.connection_class
        assert cls.__name__ == f"Hiredis{kind}"
        assert kind in {b.__name__ for b in cls.__mro__}


def test_a_pipeline_of_packed_commands_is_redis_pys_pipeline() -> None:
    plain, fast = _pair()
    commands = [("SET", "a", 1), ("HSET", "h", "f", b"v"), ("GET", "a")]
    assert b"".join(fast.pack_commands(commands)) == b"".join(bytes(p) for p in plain.pack_commands(commands))
