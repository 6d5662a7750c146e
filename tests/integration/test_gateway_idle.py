"""Envoy closes its idle connections to the picker before the picker would, so the picker's idle close never
races a check Envoy is writing: real Envoy on the ext_authz transport, the picker's own HTTP/1.1 server (its
framing and idle sweep) in this process answering checks and ``/v1/models``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from ops.envoy import EnvoyOptions, admin_get, start_envoy
from ops.servers import free_port
from services.gateway.http1 import Connections, OneByOne, headers_of, response
from services.gateway.protocol import CHECK_PREFIX, HEALTH_PATH, PickerTransport
from tests.integration.test_gateway import gateway_marks

pytestmark = gateway_marks(60)

PICKER_IDLE_S = 1.0  # Envoy's: half of it


def _answer(head: bytes, _body: bytes) -> bytes:
    """Every check refused with 429 (a check Envoy could not get answered would be its 500 instead), the
    health check and ``/v1/models`` answered 200."""
    path = headers_of(head)[":path"]
    if path.startswith(CHECK_PREFIX):
        return response(429, b"{}")
    return response(200, b"ok" if path == HEALTH_PATH else b'{"data": []}')


async def test_checks_before_and_after_an_idle_spell_are_answered_and_envoy_closes_first(tmp_path: Path) -> None:
    conns = Connections(PICKER_IDLE_S, max_connections=64)
    sweeping = asyncio.create_task(conns.sweep_forever())
    server = await asyncio.get_running_loop().create_server(lambda: OneByOne(_answer, conns=conns), "127.0.0.1", 0)
    opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_port=server.sockets[0].getsockname()[1],
                        als_port=free_port(), eds_path=tmp_path / "eds" / "engines.json",
                        transport=PickerTransport.EXT_AUTHZ, picker_idle_timeout_s=PICKER_IDLE_S,
                        epp_health_interval_s=0.1)  # the health check's connection is never idle for long
    envoy = await asyncio.to_thread(start_envoy, opts, tmp_path / "envoy", 60)
    try:
        async with httpx.AsyncClient(base_url=envoy.url, timeout=10) as client:
            async def exchange() -> list[int]:
                check = await client.post("/v1/chat/completions", json={"model": "m"})
                models = await client.get("/v1/models")
                return [check.status_code, models.status_code]

            assert await exchange() == [429, 200]
            await asyncio.sleep(2 * PICKER_IDLE_S)  # idle: Envoy's timeout and the picker's both pass
            assert await exchange() == [429, 200]
        stats = await asyncio.to_thread(admin_get, opts.admin_port, "/stats?filter=gantry_epp.upstream_cx_idle_timeout")
        closed_by_envoy = re.search(r"upstream_cx_idle_timeout: (\d+)", stats)
        assert closed_by_envoy is not None and int(closed_by_envoy.group(1)) >= 1
        assert conns.idle_closed == 0  # the picker's sweep found none of Envoy's connections idle
    finally:
        await asyncio.to_thread(envoy.stop)
        sweeping.cancel()
        server.close()
