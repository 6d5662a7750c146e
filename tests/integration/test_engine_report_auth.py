"""Engine reports authenticated per instance, end to end: real nats-server, real emulated engine servers (each
signing with the key its environment hands it), the gateway's own feed (on its loop, and through its relay
child). A server holding instance A's key but claiming instance B never puts B in the pool nor B's load in the
router; A's genuine reports are taken, and one of them recorded and published again later is refused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import nats
import pytest

from ops.auth import ENGINE, GATEWAY, Credentials
from ops.servers import ServerProcess, free_port
from services.gateway.service import Gateway, GatewayOptions
from shared.bus import subjects
from shared.bus.connection import nats_options
from shared.bus.runtime import Bus
from shared.core.kv_events import chain_hashes
from shared.envsettings import ENGINE_NATS_URL_ENV, EnvSettings
from shared.host.report_auth import METRICS, REPORT_KEY_ENV, SNAPSHOT, Verdict, derive_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
MASTER = os.urandom(32)


def _engine(nats_url: str, claims: str, key_of: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """An engine server reporting as instance ``claims``, signing with the key of instance ``key_of``; its port."""
    port = free_port()
    log = tmp / f"{claims}-{key_of}.log"
    env = {**os.environ, ENGINE_NATS_URL_ENV: nats_url, REPORT_KEY_ENV: derive_key(MASTER, key_of).hex()}
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "services.engine_server", "--port", str(port),
                                 "--served-model-name", "auth-model", "--num-gpu-blocks", "400",
                                 "--instance-id", claims, "--metrics-interval", "0.05"],
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def servers(nats_server: ServerProcess, credentials: Credentials,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """The genuine server of auth-a and a compromised one: it holds auth-a's key and claims auth-b (their ports)."""
    tmp = tmp_path_factory.mktemp("engines")
    url = credentials.url(nats_server.url, ENGINE)
    started = {"auth-a": _engine(url, "auth-a", "auth-a", tmp), "auth-b": _engine(url, "auth-b", "auth-a", tmp)}
    yield {claims: port for claims, (_, port) in started.items()}
    for p, _ in started.values():
        p.terminate()
        p.wait(10)


async def _until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("window_ms", [None, 10.0], ids=["on_loop", "relay"])
def test_a_server_claiming_another_instance_is_kept_out_and_the_genuine_one_is_taken(
        servers: dict[str, int], nats_server: ServerProcess, tmp_path: Path, window_ms: float | None) -> None:
    async def scenario() -> None:
        opts = GatewayOptions(nats_url=nats_server.url, eds_path=tmp_path / "eds.json", report_master=MASTER,
                              feed_window_s=window_ms / 1000 if window_ms is not None else None)
        gw = Gateway(opts)
        nc = await nats.connect(nats_server.url)
        gw.bus = Bus(nc, "gateway")
        relay = await gw._subscribe(nc)
        task = asyncio.create_task(relay.run()) if relay is not None else None
        verifier = gw.feed.verifier
        assert verifier is not None
        try:
            await _until(lambda: "auth-a" in gw.feed.pool.endpoints and verifier.dropped >= 10)
            assert set(gw.feed.pool.endpoints) == {"auth-a"}
            assert "auth-b" not in gw.router.state.endpoints  # no load of auth-b applied either
            assert gw.router.state.endpoints["auth-a"].metrics is not None
            # a genuine report of auth-a, recorded off the bus and published again once newer ones were taken
            sub = await nc.subscribe(subjects.engine_metrics("auth-a"))
            recorded = await sub.next_msg(timeout=15)  # reports every 50 ms; a loaded host reads them late
            await sub.unsubscribe()
            await asyncio.sleep(0.3)
            await nc.publish(recorded.subject, recorded.data, headers=recorded.headers)
            await _until(lambda: verifier.refused[METRICS, Verdict.REPLAYED] >= 1)
        finally:
            if task is not None:
                task.cancel()
            if relay is not None:
                await relay.stop()
            await nc.close()

    asyncio.run(scenario())


def test_a_gateway_started_after_an_engine_cached_a_prompt_learns_it_from_the_engines_signed_snapshot(
        servers: dict[str, int], nats_server: ServerProcess, credentials: Credentials, tmp_path: Path) -> None:
    # cached before the gateway runs: its KV events are gone, only the snapshot tells (asked as the gateway
    # identity, answered as the engine identity, signed with auth-a's key)
    prompt = list(range(1000, 1070))
    r = httpx.post(f"http://127.0.0.1:{servers['auth-a']}/v1/completions", timeout=30,
                   json={"model": "auth-model", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 200

    async def scenario() -> None:
        url = credentials.url(nats_server.url, GATEWAY)
        gw = Gateway(GatewayOptions(nats_url=url, eds_path=tmp_path / "eds.json", report_master=MASTER))
        nc = await nats.connect(url, **nats_options(EnvSettings(nats_url=url)))
        gw.bus = gw.snapshots.bus = Bus(nc, "gateway")
        await gw._subscribe(nc)
        state, verifier = gw.router.state, gw.feed.verifier
        assert verifier is not None
        try:
            await _until(lambda: "auth-a" in state.endpoints)
            hashes = chain_hashes(prompt, gw.feed.pool.endpoints["auth-a"].block_size)
            assert len(hashes) >= 4
            await _until(lambda: all(state.precise.holds(state.endpoints["auth-a"].slot, h) for h in hashes))
            assert all(verifier.refused[SNAPSHOT, v] == 0 for v in (Verdict.UNSIGNED, Verdict.FORGED))
        finally:
            await gw.snapshots.close()
            await nc.close()

    asyncio.run(scenario())
