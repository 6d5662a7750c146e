"""An engine server's NATS publisher keeps one connection for all its tasks: NATS lets the engine identity answer a
request only on the connection it arrived on (``allow_responses``), so a snapshot request taken in on one
connection and answered on another was refused ("permissions violation") and the picker never warmed up; and the
connection its tasks raced to open besides was never closed. The session's real NATS, with its identities."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import nats
import pytest

from ops.auth import ENGINE, GATEWAY, Credentials
from ops.servers import ServerProcess
from services.engine_server import publisher as publisher_module
from services.engine_server.publisher import Publisher
from services.engine_server.runner import EngineRunner
from shared.bus import subjects
from shared.bus.connection import nats_options
from shared.bus.messages import EngineKVSnapshot, KVSnapshotRequest, decode, encode
from shared.core.engine import CalibratedStepTime, Engine, SchedulerConfig
from shared.envsettings import EnvSettings


async def test_the_engine_identity_answers_a_snapshot_request_on_the_one_connection_its_publisher_holds(
    nats_server: ServerProcess, credentials: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Any] = []
    real_connect = nats.connect

    async def connect(*args: Any, **kwargs: Any) -> Any:  # the real client, counted
        nc = await real_connect(*args, **kwargs)
        opened.append(nc)
        return nc

    monkeypatch.setattr(publisher_module.nats, "connect", connect)
    engine = Engine(SchedulerConfig(num_gpu_blocks=100, enable_kv_events=True),
                    CalibratedStepTime(base_s=0.01, per_token_s=1e-5), fast_forward=False)
    instance = f"conn-{secrets.token_hex(4)}"
    pub = Publisher(EngineRunner(engine), credentials.url(nats_server.url, ENGINE), instance, "m",
                    "http://127.0.0.1:1", interval_s=5.0, snapshot_window_s=0.0)
    pub.serve_snapshots = True
    task = asyncio.create_task(pub.run())
    url = credentials.url(nats_server.url, GATEWAY)
    nc = await real_connect(url, **nats_options(EnvSettings(nats_url=url)))  # the picker's, not counted
    try:
        deadline = time.monotonic() + 30  # the publisher subscribes once connected (a slow host)
        while True:
            try:
                reply = await nc.request(subjects.engine_kv_snapshot(instance),
                                         encode(KVSnapshotRequest(nonce="n" * 32)), timeout=2)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                assert time.monotonic() < deadline, f"never answered ({len(opened)} connections opened)"
                await asyncio.sleep(0.1)
        assert decode(reply.data, EngineKVSnapshot).nonce == "n" * 32
        assert len(opened) == 1
    finally:
        await nc.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for conn in opened:  # (what a publisher leaked must not outlive the test)
            if not conn.is_closed:
                await conn.close()
