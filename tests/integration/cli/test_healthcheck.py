"""The container health check's server probe, against the real stack and against nothing."""

from __future__ import annotations

import asyncio

import pytest

from ops.healthcheck import servers_answer
from ops.servers import free_port
from shared.settings import Settings
from tests.integration.cli.conftest import Stack

pytestmark = pytest.mark.integration


def test_servers_answer_when_the_stack_runs(stack: Stack) -> None:
    settings = Settings(nats_url=stack.env["GANTRY_NATS_URL"], redis_url=stack.env["GANTRY_REDIS_URL"])
    assert asyncio.run(servers_answer(settings)) is None


def test_wrong_redis_password_is_unhealthy(stack: Stack) -> None:
    url = stack.env["GANTRY_REDIS_URL"].replace("cli-test-pw", "wrong")
    settings = Settings(nats_url=stack.env["GANTRY_NATS_URL"], redis_url=url)
    problem = asyncio.run(servers_answer(settings))
    assert problem is not None and problem.startswith("Redis unreachable")


def test_missing_nats_is_unhealthy() -> None:
    settings = Settings(nats_url=f"nats://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    problem = asyncio.run(servers_answer(settings, timeout=1.0))
    assert problem is not None and problem.startswith("NATS unreachable")
