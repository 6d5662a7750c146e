"""A counter of event-loop turns, for tests that check a handler lets other work run while it works."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turns:
    """How many times a background task got the loop (``count``), started when the block began."""

    def __init__(self) -> None:
        self.count = 0


@asynccontextmanager
async def loop_turns(interval_s: float = 0.0) -> AsyncIterator[Turns]:
    """Count the turns a task that sleeps ``interval_s`` between them gets while the block runs."""
    turns = Turns()

    async def other() -> None:
        while True:
            turns.count += 1
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    turns.count = 0
    try:
        yield turns
    finally:
        task.cancel()
