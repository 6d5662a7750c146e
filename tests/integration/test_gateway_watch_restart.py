"""`gantry gateway --watch` outlives a NATS restarted under it on its port (as `gantry up` restarts a crashed one):
the CLI's connection did not reconnect, so the watch ended "lost the connection to NATS" with NATS already back.
It still ends when NATS stays away (tests/unit/ops/test_gateway_watch_lost.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import ops.cli.gateway as gateway_cli
from ops.servers import start_nats


def test_watching_the_gateway_goes_on_when_nats_comes_back_on_its_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GANTRY_IDENTITY", raising=False)
    server = start_nats(tmp_path / "nats")
    frames: list[float] = []

    async def watch() -> None:
        task = asyncio.create_task(gateway_cli._listen(
            server.url, "redis://127.0.0.1:1/0", 0.2, 1 << 30, lambda rows: frames.append(time.monotonic())))
        try:
            while len(frames) < 2:
                assert not task.done(), task
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server.stop)
            restarted = time.monotonic()
            again = await asyncio.to_thread(start_nats, tmp_path / "nats", server.port)
            try:
                deadline = time.monotonic() + 10
                while sum(t > restarted for t in frames) < 10 and time.monotonic() < deadline:
                    if task.done():
                        task.result()  # before: CliError "lost the connection to NATS"
                    await asyncio.sleep(0.05)
                assert not task.done()
                assert sum(t > restarted for t in frames) >= 10
            finally:
                await asyncio.to_thread(again.stop)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(watch())
    finally:
        server.stop()
