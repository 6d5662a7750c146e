"""Stopping background tasks: a lost cancellation does not leave a task running (shared.host.tasks)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time

import pytest

from shared.host.tasks import cancel_until_done, run_until_signalled


async def _loop_on_wait_for(futures: list[asyncio.Future[int]], rounds: list[int]) -> None:
    """A loop whose every await is an ``asyncio.wait_for``, as a client library's socket write is."""
    while True:
        fut = asyncio.get_running_loop().create_future()
        futures.append(fut)
        rounds.append(await asyncio.wait_for(fut, 10))


async def test_a_cancellation_lost_in_wait_for_is_repeated_until_the_task_ends() -> None:
    futures: list[asyncio.Future[int]] = []
    rounds: list[int] = []
    task = asyncio.create_task(_loop_on_wait_for(futures, rounds))
    await asyncio.sleep(0)
    futures[-1].set_result(1)  # the awaited operation completes in the same loop turn as the cancel
    left = await cancel_until_done([task], timeout=5, every=0.01)
    assert left == set()
    assert task.cancelled()


async def test_a_task_that_honours_the_cancel_is_not_interrupted_in_its_cleanup() -> None:
    cleaned: list[bool] = []

    async def with_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # shorter than the re-cancel interval
            cleaned.append(True)

    task = asyncio.create_task(with_cleanup())
    await asyncio.sleep(0)
    assert await cancel_until_done([task], every=0.5) == set()
    assert cleaned == [True]


async def test_a_task_that_never_ends_is_returned_once_the_bound_has_passed() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_until_done([task], timeout=0.1, every=0.02) == {task}
    release.set()
    task.cancel()
    await asyncio.wait([task], timeout=1)
    assert task.done()


async def test_tasks_already_done_and_an_empty_list_return_at_once() -> None:
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    assert await cancel_until_done([done]) == set()
    assert await cancel_until_done([]) == set()


@pytest.mark.parametrize("every", [0.0, -1.0, math.nan])
async def test_an_interval_that_is_not_positive_is_refused_before_anything_is_cancelled(every: float) -> None:
    task = asyncio.create_task(asyncio.sleep(3600))
    with pytest.raises(ValueError, match="interval"):
        await cancel_until_done([task], every=every)
    assert not task.done()
    task.cancel()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_cancels_the_service_and_its_cleanup_runs_before_the_return(sig: signal.Signals) -> None:
    cleaned: list[str] = []

    async def service() -> None:
        try:
            os.kill(os.getpid(), sig)
            await asyncio.sleep(30)  # only the signal's cancellation ends this in time
        finally:
            await asyncio.sleep(0)  # cleanup may still await (a server's grace period)
            cleaned.append("closed")

    async def main() -> float:
        start = time.monotonic()
        await run_until_signalled(service())
        return time.monotonic() - start

    assert asyncio.run(main()) < 5 and cleaned == ["closed"]


def test_a_service_that_fails_by_itself_raises_its_error_and_is_not_taken_for_a_stop() -> None:
    async def service() -> None:
        raise RuntimeError("bus lost")

    with pytest.raises(RuntimeError, match="bus lost"):
        asyncio.run(run_until_signalled(service()))
