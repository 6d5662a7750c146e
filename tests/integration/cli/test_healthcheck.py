"""The container health check's server probe, against the real stack and against nothing."""

from __future__ import annotations

import asyncio

import pytest

from ops.auth import with_userinfo
from ops.healthcheck import servers_answer
from ops.servers import free_port
from shared.settings import CREDENTIALS_FILE, Settings
from tests.integration.cli.conftest import Stack

pytestmark = pytest.mark.integration


def as_cli(stack: Stack, **urls: str) -> Settings:
    """The settings of a process speaking as the operator CLI, with the stack's generated credentials."""
    return Settings(
        nats_url=urls.get("nats_url", stack.env["GANTRY_NATS_URL"]),
        redis_url=urls.get("redis_url", stack.env["GANTRY_REDIS_URL"]),
        identity="cli", credentials_file=str(stack.home / CREDENTIALS_FILE),
    )


def test_servers_answer_when_the_stack_runs(stack: Stack) -> None:
    assert asyncio.run(servers_answer(as_cli(stack))) is None


def test_wrong_redis_password_is_unhealthy(stack: Stack) -> None:
    settings = as_cli(stack, redis_url=with_userinfo(stack.env["GANTRY_REDIS_URL"], "cli", "wrong"))
    problem = asyncio.run(servers_answer(settings))
    assert problem is not None and problem.startswith("Redis unreachable")


def test_no_credentials_is_unhealthy(stack: Stack) -> None:
    settings = Settings(nats_url=stack.env["GANTRY_NATS_URL"], redis_url=stack.env["GANTRY_REDIS_URL"])
    problem = asyncio.run(servers_answer(settings))
    assert problem is not None and "unreachable" in problem


def test_missing_nats_is_unhealthy() -> None:
    settings = Settings(nats_url=f"nats://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    problem = asyncio.run(servers_answer(settings, timeout=1.0))
    assert problem is not None and problem.startswith("NATS unreachable")
