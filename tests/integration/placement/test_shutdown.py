"""Services stop promptly and cleanly on SIGTERM, so Ctrl-C, `gantry down` and orchestrators never wait."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from ops.auth import Credentials
from ops.servers import ServerProcess, start_nats
from ops.stack import LocalStack, service_argv
from shared.bus import streams
from shared.bus.runtime import prepare
from shared.settings import Settings
from shared.state import StateStore
from tests.integration.placement.conftest import CONSUMERS, TIMINGS, Stack, _db_counter, wait_until

# Kubernetes and `gantry up` wait a few seconds after SIGTERM before SIGKILL; a rolling upgrade waits for each exit.
# A service exits within ~2 s whatever NATS does; the bound leaves room for a loaded host.
EXIT_BOUND_S = 5.0


async def _every_consumer_has_a_waiting_pull(stack: Stack) -> bool:
    js = stack.nc.jetstream()
    for stream, durable in CONSUMERS:
        info = await js.consumer_info(stream, durable)
        if not info.num_waiting:
            return False
    return True


async def test_every_service_exits_with_code_zero_within_seconds_of_sigterm(stack: Stack) -> None:
    stack.start_services()
    await stack.wait_ready(workers=0)
    # Only a service whose pull loops are fetching exercises the shutdown path that used to hang.
    await wait_until(lambda: _every_consumer_has_a_waiting_pull(stack), 20, "pull loops fetching")
    for proc in stack.procs.values():
        proc.send_signal(signal.SIGTERM)
    codes = {}
    for name, proc in stack.procs.items():
        try:
            codes[name] = proc.wait(5)
        except subprocess.TimeoutExpired:
            codes[name] = None
    assert codes == {name: 0 for name in stack.procs}


# The consumers each service pulls from once it is ready.
PULLS = {
    "fitting": [(streams.STREAM_FILTERED, streams.CONSUMER_FITTING)],
    "reconciler": [(streams.STREAM_CMD, streams.CONSUMER_SCALE), (streams.STREAM_SCORED, streams.CONSUMER_COMMIT),
                   (streams.STREAM_STATUS, streams.CONSUMER_STATUS)],
}


@pytest.fixture
def own_nats(tmp_path: Path, credentials: Credentials) -> Iterator[ServerProcess]:
    """A NATS server of this test's own (the session's must survive it), with the session's identities."""
    server = start_nats(tmp_path / "nats", auth=credentials)
    try:
        yield server
    finally:
        server.stop()  # continues it first if the test froze it


async def _pulling(nats_url: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for stream, durable in (pull for pulls in PULLS.values() for pull in pulls):
            if not (await js.consumer_info(stream, durable)).num_waiting:
                return False
        return True
    finally:
        await nc.close()


# SIGKILL: NATS gone, its connections reset (SIGTERM may come before a service has read the reset: its drain then
# waited 10 s for a reply). SIGSTOP: NATS there but not answering, as when its host or network is gone (20 s).
@pytest.mark.parametrize("fate", [signal.SIGKILL, signal.SIGSTOP], ids=["nats-killed", "nats-not-answering"])
async def test_services_exit_with_code_zero_within_seconds_of_sigterm_when_nats_is_gone(
    own_nats: ServerProcess, redis_server: ServerProcess, credentials: Credentials, tmp_path: Path, fate: int,
) -> None:
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{next(_db_counter)}"
    store = StateStore.from_url(redis_url)
    await store.r.flushdb()
    await store.close()
    settings = Settings(nats_url=own_nats.url, redis_url=redis_url, **TIMINGS)
    nc = await nats.connect(own_nats.url)
    await prepare(nc, settings, streams.ALL_CONSUMERS)
    await nc.close()
    launcher = LocalStack(settings, home=tmp_path, external_servers=True, credentials=credentials)
    try:
        procs = {name: launcher.spawn(name, service_argv(name)).process for name in PULLS}
        await wait_until(lambda: _pulling(own_nats.url), 30, "services pulling")
        own_nats.process.send_signal(fate)
        started = time.monotonic()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(max(0.0, started + EXIT_BOUND_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        assert codes == {name: 0 for name in procs}, f"exit codes after {time.monotonic() - started:.1f} s"
    finally:
        launcher.stop()
