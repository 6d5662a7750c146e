"""Issue 18 items 2-3, the picker's side: the gateway's pool is placement's RUNNING instances. Through Envoy, a
streamed chat completion lands on a RUNNING instance's engine; after a scale-down the DRAINING instance takes
no new request, leaves Envoy's endpoint file at once, and still finishes the stream it was serving."""

from __future__ import annotations

import asyncio
import json
import os
from unittest import mock

import httpx
import pytest

from ops.auth import CLI
from ops.cli.gateway import EndpointRow, one_frame
from ops.envoy import SERVED
from ops.gateway_routing import instances_by_address
from ops.stack import GatewayPorts
from shared.bus import subjects
from shared.bus.messages import EngineMetrics, decode
from shared.core.placement.domain import GIB, InstanceState, ModelSpec, PlacementStrategy
from shared.envsettings import without_user
from shared.host.report_auth import METRICS, ReportVerifier, Verdict

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MODEL = ModelSpec(name="llama-3.1-8b", source="meta-llama/Llama-3.1-8B-Instruct", weight_bytes=16 * GIB,
                  placement_strategy=PlacementStrategy.SPREAD)
LONG = 400  # tokens: ~3 s of streaming on the emulated H100, in flight across the scale-down


class Stream:
    """One streamed chat completion through the gateway: where Envoy sent it, then how it ended."""

    def __init__(self, http: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> None:
        self.served: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._run(http, url, prompt, tokens))

    async def _run(self, http: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[int, str | None]:
        body = {"model": MODEL.name, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                "ignore_eos": True, "stream": True}
        chunks, reason = 0, None
        try:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
                assert r.status_code == 200, r.status_code
                self.served.set_result(r.headers[SERVED])
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        chunks += bool(choice.get("delta", {}).get("content"))
                        reason = choice.get("finish_reason") or reason
        except BaseException as err:
            if not self.served.done():
                self.served.set_exception(err)
            raise
        return chunks, reason


def endpoint_file(ports: GatewayPorts) -> dict[str, str]:
    """Envoy's endpoint file as the picker wrote it: address → instance id."""
    return instances_by_address(ports.eds)


async def gateway_view(stack: Stack) -> list[EndpointRow]:
    """One frame of ``gantry gateway`` on the stack's servers, as the CLI identity. Its URLs go through the
    environment, as a user passes them: the CLI refuses a URL holding a secret as a flag's value."""
    settings, creds = stack.launcher.settings, stack.launcher.credentials
    assert creds is not None
    nats_url, redis_url = (creds.url(without_user(u), CLI) for u in (settings.nats_url, settings.redis_url))
    with mock.patch.dict(os.environ, {"GANTRY_NATS_URL": nats_url, "GANTRY_REDIS_URL": redis_url}):
        return await one_frame(None, None, 0.2)


async def reports_are_signed_by_their_instance(stack: Stack, ids: set[str]) -> None:
    """Each engine server the fleet started signs its reports with its own instance's key (the stack's master key
    is what the gateway checks them with)."""
    creds = stack.launcher.credentials
    assert creds is not None and creds.report_key
    verifier = ReportVerifier(bytes.fromhex(creds.report_key))
    sub = await stack.nc.subscribe(subjects.ENGINE_METRICS_ALL)
    seen: set[str] = set()
    try:
        while seen != ids:
            msg = await sub.next_msg(timeout=15)
            m = decode(msg.data, EngineMetrics)
            verdict = verifier.check(m.instance_id, msg.data, msg.headers, METRICS)
            assert verdict is Verdict.ACCEPTED, (m.instance_id, verdict)
            seen.add(m.instance_id)
    finally:
        await sub.unsubscribe()


async def running_engine(http: httpx.AsyncClient, address: str) -> tuple[str, int]:
    """The engine at ``address``, as it describes itself: its instance id and requests it is running."""
    info = (await http.get(f"http://{address}/server_info")).json()
    metrics = (await http.get(f"http://{address}/metrics")).text
    running = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("vllm:num_requests_running"))
    return info["instance_id"], int(running)


async def test_the_gateway_routes_to_running_instances_and_a_drain_finishes_in_flight(stack: Stack) -> None:
    stack.env["GANTRY_DRAIN_TIMEOUT_S"] = "30"  # the drain ends by the engine going idle, not by the timeout
    stack.start_services()
    stack.start_workers("fleet", "--count", "2", "--gpus", "1", "--heartbeat-interval", "0.2", "--engines",
                        "--drain-settle", "0.3")
    ports = await asyncio.to_thread(stack.launcher.start_gateway)
    await stack.wait_ready(workers=2)
    await stack.scale(MODEL, 2)

    async def two_routable() -> set[str]:
        insts = await stack.instances(MODEL.name)
        running = {i.id for i in insts if i.state is InstanceState.RUNNING}
        return running if len(running) == 2 and set(endpoint_file(ports).values()) == running else set()

    ids: set[str] = await wait_until(two_routable, 30, "2 RUNNING replicas in Envoy's endpoint file")
    address = {iid: addr for addr, iid in endpoint_file(ports).items()}
    await reports_are_signed_by_their_instance(stack, ids)

    async with httpx.AsyncClient() as http:
        # long streams until each instance serves one (the picker spreads load; distinct prompts, no affinity)
        streams: dict[str, Stream] = {}
        started: list[Stream] = []  # every long stream, awaited at the end (a task left behind errs at close)
        for n in range(8):
            s = Stream(http, ports.url, f"question {n}: " + "why? " * n, LONG)
            started.append(s)
            served = await asyncio.wait_for(asyncio.shield(s.served), 30)
            streams.setdefault(endpoint_file(ports).get(served, served), s)
            if streams.keys() == ids:
                break
        assert streams.keys() == ids, f"streams landed on {sorted(streams)}, instances are {sorted(ids)}"
        for iid in ids:  # server side: the engine behind the address is that RUNNING instance, and it is busy
            engine_id, running = await running_engine(http, address[iid])
            assert engine_id == iid and running >= 1

        await stack.scale(MODEL, 1, with_spec=False)

        async def draining() -> str | None:
            return next((i.id for i in await stack.instances(MODEL.name) if i.state is InstanceState.DRAINING), None)

        drained: str = await wait_until(draining, 30, "a DRAINING replica")
        kept = (ids - {drained}).pop()

        async def out_of_the_endpoint_file() -> bool:
            return drained not in endpoint_file(ports).values()

        await wait_until(out_of_the_endpoint_file, 15, "the DRAINING instance out of Envoy's endpoint file")
        assert not streams[drained].task.done(), "the drained instance's stream should still be in flight"
        # `gantry gateway`, as the CLI identity: both engines report, only the RUNNING one is in the pool
        async def both_in_a_frame() -> dict[str, tuple[str, bool]] | None:
            # a frame lists the engines whose reports arrived in its 0.4 s: on a loaded host one can be late
            rows = {r.instance: (r.state, r.routable) for r in await gateway_view(stack)}
            return rows if {drained, kept} <= rows.keys() else None

        rows = await wait_until(both_in_a_frame, 15, "a frame of `gantry gateway` with both engines")
        assert rows == {drained: ("DRAINING", False), kept: ("RUNNING", True)}, rows
        # no new request reaches the draining instance
        for n in range(4):
            s = Stream(http, ports.url, f"after the drain {n}", 2)
            assert await asyncio.wait_for(asyncio.shield(s.served), 30) == address[kept]
            assert await s.task == (2, "length")
        # its stream in flight (on a host Envoy no longer lists) still ends whole
        assert await streams[drained].task == (LONG, "length")
        assert await streams[kept].task == (LONG, "length")
        assert [await s.task for s in started] == [(LONG, "length")] * len(started)

    async def deleted() -> bool:
        return [(i.id, i.state) for i in await stack.instances(MODEL.name)] == [(kept, InstanceState.RUNNING)]

    await wait_until(deleted, 30, "the drained replica deleted")
    assert set(endpoint_file(ports).values()) == {kept}
    assert not [d for d in stack.dead_letters if d.service == "gateway"], stack.dead_letters
