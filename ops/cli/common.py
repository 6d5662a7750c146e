"""What every CLI command shares: its connection options, and (from ``ops.cli.connect``, which has no typer)
settings, fail-fast connections and output helpers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from ops.cli.connect import (
    CONNECT_TIMEOUT_S,
    STACK_HINT,
    connect_nats,
    connect_redis,
    connection_settings,
    console,
    import_nats,
    load,
    print_json,
    redact,
    run_async,
)
from ops.cli.errors import Interrupted
from ops.cli.output import echo

__all__ = [
    "CONNECT_TIMEOUT_S", "STACK_HINT", "JsonFlag", "NatsUrl", "RedisUrl", "connect_nats", "connect_redis",
    "connection_settings", "console", "echo", "import_nats", "load", "print_json", "redact", "run",
]

T = TypeVar("T")

NatsUrl = Annotated[
    str | None,
    typer.Option("--nats-url", help="NATS URL (env GANTRY_NATS_URL; default nats://127.0.0.1:4222)"),
]
RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL (env GANTRY_REDIS_URL; default redis://127.0.0.1:6379/0)"),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of a table")]


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine; Ctrl-C ends it quietly with the conventional exit code."""
    try:
        return run_async(coro_fn)
    except Interrupted:
        raise typer.Exit(130) from None
