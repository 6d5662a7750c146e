"""A command whose server goes away after it connected (the stack stopped under `scale --wait`, `delete` or
`events --follow`) ends with one line naming the server and exit code 1, never a traceback."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ops.cli.connect import lost_server, run_async
from ops.cli.errors import CliError


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """What a client meets when its server goes away: the connection closes under it."""
    writer.close()


def test_redis_going_away_mid_command_is_one_line_and_exit_1() -> None:
    async def command() -> None:
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # no retries: redis-py's default backoff would only make the test slower, not different
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        try:
            await client.get("gantry:desired")
        finally:
            await client.aclose()
            server.close()

    with pytest.raises(CliError) as failed:
        run_async(command)
    assert str(failed.value).startswith("lost the connection to Redis (")
    assert "\n" not in str(failed.value) and failed.value.exit_code == 1


def test_a_closed_nats_connection_is_named_as_nats() -> None:
    assert lost_server(nats.errors.ConnectionClosedError()) == "NATS"


def test_an_error_of_the_command_itself_is_not_taken_for_a_lost_server() -> None:
    async def command() -> None:
        raise ValueError("a bug, not a server gone")

    with pytest.raises(ValueError, match="a bug"):
        run_async(command)


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "nats://127.0.0.1:{port}"])
def test_the_reachability_probe_knocks_where_nats_py_connects(form: str) -> None:
    # nats-py takes a URL without a scheme as "nats://" + it; the probe before the connection must look at the
    # same host and port (it looked at 127.0.0.1's default port: "connection refused" for a NATS that answers)
    from ops.cli.connect import _probe
    from ops.servers import free_port

    async def command() -> None:
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await _probe(form.format(port=port), free_port(), "NATS", 2.0)
        finally:
            server.close()

    run_async(command)
