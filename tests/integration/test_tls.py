"""NATS over TLS (``gantry up --tls``): a client that trusts the stack's CA connects; others are refused."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from ops.auth import Credentials, without_userinfo
from ops.servers import ServerProcess, free_port, start_nats
from ops.stack import LocalStack, WorkerFleet
from ops.tls import ensure_tls
from shared.bus.runtime import nats_options
from shared.paths import TlsFiles
from shared.settings import Settings
from shared.state import StateStore

pytest.importorskip("cryptography")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def tls_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("tls-home"))


@pytest.fixture(scope="module")
def tls_nats(tls_home: Path) -> Iterator[tuple[ServerProcess, TlsFiles]]:
    files = ensure_tls(tls_home)
    server = start_nats(tls_home / "nats", auth=Credentials.generate(), tls=files)
    yield server, files
    server.stop()


def test_the_generated_key_is_private_and_reused(tls_home: Path, tls_nats: tuple[ServerProcess, TlsFiles]) -> None:
    _, files = tls_nats
    assert files.key.stat().st_mode & 0o777 == 0o600
    before = files.cert.read_bytes()
    assert ensure_tls(tls_home).cert.read_bytes() == before  # generated once, then used as it is


async def test_a_client_trusting_the_ca_connects_and_exchanges_messages(
    tls_nats: tuple[ServerProcess, TlsFiles],
) -> None:
    server, files = tls_nats
    nc = await nats.connect(server.url, **nats_options(Settings(tls_ca_file=str(files.ca))))
    try:
        sub = await nc.subscribe("tls.check")
        await nc.publish("tls.check", b"over tls")
        msg = await sub.next_msg(timeout=15)
        assert msg.data == b"over tls"
        assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
    finally:
        await nc.close()


async def test_a_client_not_trusting_the_ca_is_refused(tls_nats: tuple[ServerProcess, TlsFiles]) -> None:
    server, _ = tls_nats
    with pytest.raises((ssl.SSLError, OSError, nats.errors.Error)):
        await nats.connect(server.url, tls=ssl.create_default_context(), allow_reconnect=False, connect_timeout=3)


async def test_a_plain_client_is_refused(tls_nats: tuple[ServerProcess, TlsFiles]) -> None:
    server, _ = tls_nats
    plain = server.url.replace("tls://", "nats://", 1)
    with pytest.raises((nats.errors.Error, OSError, TimeoutError, AssertionError)):
        nc = await nats.connect(plain, allow_reconnect=False, connect_timeout=3)
        # nats-py upgrades to TLS by itself when the server demands it, with the system's CAs: refused above.
        await nc.close()
        raise AssertionError("a client without the CA connected")
    assert without_userinfo(plain).startswith("nats://")


async def test_a_whole_stack_runs_over_tls(tmp_path: Path) -> None:
    settings = Settings(nats_url=f"nats://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        js_storage="memory", heartbeat_interval_s=0.5)
    stack = LocalStack(settings, WorkerFleet(count=2, gpus=1), home=tmp_path, tls=True)
    await asyncio.to_thread(stack.start)
    try:
        assert "tls" in (tmp_path / "nats" / "nats-auth.conf").read_text()
        store = StateStore.from_url(stack.settings_for("admin").redis_url)
        try:
            for _ in range(100):
                if len(await store.worker_names()) == 2:
                    break
                await asyncio.sleep(0.2)
            assert await store.worker_names() == {"w0", "w1"}  # the fleet and the reconciler spoke over TLS
        finally:
            await store.close()
        assert stack.dead_children() == []
    finally:
        await asyncio.to_thread(stack.stop)
