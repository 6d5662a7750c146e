"""Redis commands packed by hiredis (C) instead of redis-py's asyncio packer (Python).

redis-py's asyncio connection packs each command argument by argument in Python, growing one bytes buffer by
concatenation: a Lua call with a few hundred arguments (a commit or converge batch) costs a millisecond of
CPU there, the largest single cost of the reconciler at 500 placements/s. redis-py's sync client already uses
hiredis for this; here the asyncio connection classes get the same packer. Arguments of any other type than
bytes, str or int (floats, memoryviews...) go through redis-py's own packer, so their wire form and the
errors for unsupported types are exactly redis-py's.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis

_FAST_TYPES = frozenset({bytes, str, int})
_classes: dict[type[Any], type[Any]] = {}


class _HiredisPacking:
    """Mixin over a redis-py asyncio connection class: ``pack_command`` through ``hiredis.pack_command``."""

    def pack_command(self, *args: Any) -> list[bytes]:
        """The RESP bytes of one command (redis-py's contract: the first argument may hold several words)."""
        first = args[0]
        if type(first) is str and " " in first:
            args = (*first.encode().split(), *args[1:])
        elif type(first) is bytes and b" " in first:
            args = (*first.split(), *args[1:])
        for arg in args:
            if type(arg) not in _FAST_TYPES:
                return super().pack_command(*args)  # type: ignore[misc,no-any-return]
        return [hiredis.pack_command(args)]


def fast_packing(client: aioredis.Redis) -> aioredis.Redis:
    """``client`` with its pool's connections packing commands through hiredis (before any is opened)."""
    pool = client.connection_pool
    base = pool.connection_class
    fast = _classes.get(base)
    if fast is None:
        fast = _classes[base] = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    pool.connection_class = fast
    return client
