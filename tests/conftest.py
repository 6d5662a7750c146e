"""Fixtures shared by the whole suite: real NATS and Redis servers for integration tests."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest

from ops.auth import Credentials
from ops.servers import ServerProcess, start_nats, start_redis

# Hypothesis is imported (and its modules assertion-rewritten by pytest) at collection, whatever subset runs.
# Otherwise its pytest plugin imports a module at session end, after the integration tests, and pytest's
# rewrite of it there intermittently failed with CPython 3.11's "AST constructor recursion depth mismatch".

# A shell without job control starts background commands with SIGINT ignored, and an ignored signal stays
# ignored across exec: run that way (nohup, a backgrounded CI runner), every `gantry up`, `top` or demo the
# tests start would shrug off the Ctrl-C the tests send it. The suite restores the default for its children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Some tests run the picker in this process, and gRPC then keeps threads here with fork handlers of its own. A
# child made by a real fork() of this process runs those handlers: gRPC restarts its poller in the child, the child
# closes its descriptors before exec, and the poller aborts it (SIGABRT, "epoll_wait error: Bad file descriptor")
# before it runs its command. A stack's child "never got ready" that way (1 spawn in 50) while children were
# forked with a preexec_fn. None is now: the launcher and the fleet start theirs through an exec wrapper, with
# vfork (shared.host.lifetime), and no test passes one. But pexpect (the CLI tests) starts its children with
# forkpty, a real fork: with a gRPC channel live here, 18 of 300 such children aborted (0 of 300 with this set).
# Nothing forked by the suite uses gRPC before exec, so gRPC's fork support stays off for the session (read when
# gRPC starts; children inherit it).
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"


SECURITY_WORKERS = ("w0", "w1", "w2")
"""Worker agents with their own identities on the session's servers (the security tests speak as them)."""


@pytest.fixture(scope="session")
def credentials() -> Credentials:
    """The session servers' identities: every role, and the agents of ``SECURITY_WORKERS`` (auth is on, as in
    every stack; ``server.url`` is the admin's)."""
    return Credentials.generate(workers=SECURITY_WORKERS)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, credentials: Credentials) -> Iterator[ServerProcess]:
    """A real nats-server with JetStream, shared by the session (tests use distinct subjects/streams)."""
    server = start_nats(Path(tmp_path_factory.mktemp("nats")), auth=credentials)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory, credentials: Credentials) -> Iterator[ServerProcess]:
    """A real redis-server, shared by the session."""
    server = start_redis(Path(tmp_path_factory.mktemp("redis")), auth=credentials)
    yield server
    server.stop()
