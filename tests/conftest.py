"""Fixtures shared by the whole suite: real NATS and Redis servers for integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest

from ops.servers import ServerProcess, start_nats, start_redis

# Hypothesis is imported (and its modules assertion-rewritten by pytest) at collection, whatever subset runs.
# Otherwise its pytest plugin imports a module at session end, after the integration tests, and pytest's
# rewrite of it there intermittently failed with CPython 3.11's "AST constructor recursion depth mismatch".


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real nats-server with JetStream, shared by the session (tests use distinct subjects/streams)."""
    server = start_nats(Path(tmp_path_factory.mktemp("nats")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real redis-server, shared by the session."""
    server = start_redis(Path(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()
