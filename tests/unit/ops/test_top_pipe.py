"""`gantry top` to a pipe or a file prints a frame per interval (a live display there wrote nothing until it
stopped, and nothing at all when it was killed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import ops.cli.client
import ops.cli.top as top_cli
from ops.view import ClusterSnapshot
from shared.core.placement.domain import GIB, Gpu, Worker
from shared.settings import Settings

SNAPSHOT = ClusterSnapshot(taken_at=100.0, workers=(Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),),
                                                           ram_total=GIB),))


class Stop(BaseException):
    """Ends the endless loop of frames (an Exception would be shown as "cannot read cluster state")."""


class Store:
    async def aclose(self) -> None:
        return None


def test_top_to_a_pipe_prints_each_frame_as_it_is_drawn(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    reads = 0
    printed_before_exit = -1

    async def connect(settings: object) -> Store:
        return Store()

    async def snapshot(redis: object, settings: object, *args: Any) -> ClusterSnapshot:
        nonlocal reads, printed_before_exit
        reads += 1
        if reads == 3:
            printed_before_exit = capsys.readouterr().out.count("gantry top ")
            raise Stop
        return SNAPSHOT

    monkeypatch.setattr(top_cli, "connect_redis", connect)
    monkeypatch.setattr(ops.cli.client, "read_snapshot", snapshot)
    with pytest.raises(Stop):
        asyncio.run(top_cli._top(Settings(), 0.01, once=False))
    assert printed_before_exit == 2  # what a reader of the pipe had while top ran: both frames
