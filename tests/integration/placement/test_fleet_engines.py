"""Issue 18 item 3, worker side: a fleet started with ``--engines`` runs a real emulated engine server per
RUNNING instance, drains for real on scale-down and leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.stack import pid_alive
from shared.bus import subjects
from shared.bus.messages import EngineMetrics, decode
from shared.core.placement.domain import GIB, InstanceState, ModelSpec, PlacementStrategy

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

# A catalogue model: its servers emulate it (about 6-7 ms per token on one H100 for a lone request).
MODEL = ModelSpec(name="llama-3.1-8b", source="meta-llama/Llama-3.1-8B-Instruct", weight_bytes=16 * GIB,
                  placement_strategy=PlacementStrategy.SPREAD)
STREAM_TOKENS = 500  # about 3.5 s of streaming: long enough to be in flight across the scale-down


def engine_pid(instance_id: str) -> int | None:
    """The pid of the engine server started for ``instance_id`` (found by its command line), if one runs."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"services.engine_server" in argv and instance_id.encode() in argv:
            return int(proc.name)
    return None


async def stream_completion(http: httpx.AsyncClient, url: str) -> tuple[int, str | None, float]:
    """Stream a long completion: (chunks with text, finish reason, when the stream ended)."""
    body = {"model": MODEL.name, "prompt": "hello", "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True}
    chunks, reason = 0, None
    async with http.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            chunks += bool(choice.get("text"))
            reason = choice.get("finish_reason") or reason
    return chunks, reason, time.monotonic()


async def gone_at(pid: int) -> float:
    """When process ``pid`` stops running (polled every 20 ms)."""
    while pid_alive(pid):
        await asyncio.sleep(0.02)
    return time.monotonic()


def reaped(pid: int | None) -> Callable[[], Awaitable[bool]]:
    """A check: process ``pid`` is gone altogether (exited and reaped by its parent, not a zombie)."""

    async def check() -> bool:
        return not Path(f"/proc/{pid}").exists()

    return check


async def test_engines_serve_their_instances_and_drain_before_stopping(stack: Stack) -> None:
    stack.env["GANTRY_DRAIN_TIMEOUT_S"] = "30"  # the drain must end by the engine going idle, not by the timeout
    stack.start_workers("fleet", "--count", "2", "--gpus", "1", "--heartbeat-interval", "0.2", "--engines",
                        "--drain-settle", "0.3")
    stack.start_services()
    urls: dict[str, str] = {}

    async def on_metrics(msg: Any) -> None:
        m = decode(msg.data, EngineMetrics)
        urls[m.instance_id] = m.url

    await stack.nc.subscribe(subjects.ENGINE_METRICS_ALL, cb=on_metrics)
    await stack.wait_ready(workers=2)

    await stack.scale(MODEL, 2)

    async def two_running() -> set[str]:
        insts = await stack.instances(MODEL.name)
        ok = len(insts) == 2 and all(i.state is InstanceState.RUNNING for i in insts)
        return {i.id for i in insts} if ok else set()

    ids: set[str] = await wait_until(two_running, 30, "2 RUNNING replicas")
    # RUNNING only once the server answers: both already publish (as the engine identity) under their instance id
    async def both_reporting() -> bool:
        return ids <= urls.keys()

    await wait_until(both_reporting, 15, "both engines reporting on NATS")
    pids = {i: engine_pid(i) for i in ids}
    assert all(pids.values()), pids

    async with httpx.AsyncClient() as http:
        for iid in ids:
            info = (await http.get(f"{urls[iid]}/server_info")).json()
            assert (info["instance_id"], info["served_model_name"]) == (iid, MODEL.name)
            assert info["emulated_model"] == "llama-3.1-8b-instruct"  # the engine spec comes from the catalogue
            done = await http.post(f"{urls[iid]}/v1/completions", json={"model": MODEL.name, "prompt": "hi",
                                                                       "max_tokens": 3, "ignore_eos": True})
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3

        streams = {i: asyncio.create_task(stream_completion(http, urls[i])) for i in ids}
        await asyncio.sleep(0.3)
        await stack.scale(MODEL, 1, with_spec=False)

        async def draining() -> str | None:
            return next((i.id for i in await stack.instances(MODEL.name) if i.state is InstanceState.DRAINING), None)

        drained: str = await wait_until(draining, 30, "a DRAINING replica")
        stopped = asyncio.create_task(gone_at(pids[drained] or 0))
        assert not streams[drained].done(), "the stream should still be in flight when the drain starts"

        chunks, reason, ended = await streams[drained]
        assert (chunks, reason) == (STREAM_TOKENS, "length"), "the drained server must finish its stream"
        stopped_at = await asyncio.wait_for(stopped, 15)
        assert stopped_at > ended, "the drained server stopped before its in-flight stream finished"
        await wait_until(reaped(pids[drained]), 15, "the fleet reaping the server it stopped")
        kept = (ids - {drained}).pop()
        assert (await streams[kept])[:2] == (STREAM_TOKENS, "length")

    async def one_left() -> bool:
        insts = await stack.instances(MODEL.name)
        return [(i.id, i.state) for i in insts] == [(kept, InstanceState.RUNNING)]

    await wait_until(one_left, 30, "the drained replica deleted, the other RUNNING")
    assert pid_alive(pids[kept] or 0)

    # The fleet stops on SIGTERM and takes its servers with it.
    fleet = stack.procs["fleet"]
    fleet.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(fleet.wait, 15) == 0
    assert not Path(f"/proc/{pids[kept]}").exists(), "the fleet left an engine server behind"
    assert all(engine_pid(i) is None for i in ids)
