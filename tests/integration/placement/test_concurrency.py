"""Done-when 2 and 3: several replicas of every service, bursts, kill -9; never double-booked, nothing lost."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import msgspec
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ops.servers import ServerProcess, free_port
from services import SERVICE_COMMANDS
from shared.bus.messages import Heartbeat
from shared.core.placement.domain import GIB, Category, InstanceState, ModelSpec
from shared.host.tasks import cancel_until_done
from shared.state import StateStore

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


def llm(n: int) -> ModelSpec:
    return ModelSpec(name=f"llm{n}", source=f"org/llm{n}", weight_bytes=14 * GIB)


def embedder(n: int) -> ModelSpec:
    return ModelSpec(
        name=f"emb{n}", source=f"org/emb{n}", weight_bytes=20 * GIB, categories=(Category.EMBEDDING,)
    )


class LedgerChecker:
    """Polls the ledger while the burst runs and remembers any GPU ever claimed beyond capacity.

    The block owns its polling task: it ends with the block (a lone cancel can be lost on Python 3.11 inside
    redis-py's ``wait_for``, and the task then polled on past its test until the session's Redis stopped, its
    error never retrieved), and a poll that failed is raised there, not lost."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.violations: list[str] = []
        self.checks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.violations += await self.store.overbooked()
            self.checks += 1
            await asyncio.sleep(0.01)  # the 500-replica burst settles in about a second

    async def __aenter__(self) -> LedgerChecker:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        still = await cancel_until_done([self._task], timeout=30)
        assert not still, "the ledger checker did not stop within 30 s of its cancellation"
        if not self._task.cancelled() and self._task.exception() is not None:
            raise AssertionError("the ledger checker failed while the test ran") from self._task.exception()


class Settling:
    """A settle check's verdict; falsy while unsettled, and then its repr says what is off (a timeout prints it)."""

    def __init__(self, off: str = "", stack: Stack | None = None) -> None:
        self.off = off
        self.stack = stack

    def __bool__(self) -> bool:
        return not self.off

    def __repr__(self) -> str:
        if not self.off or self.stack is None:
            return self.off or "settled"
        return f"{self.off}; services' last warnings: {service_warnings(self.stack)}"


STARTED = "app starting..."  # a hosted service's first log line: a restarted process appends to the same log


def service_warnings(stack: Stack, per_log: int = 3) -> dict[str, list[str]]:
    """The last few warning or error lines of each process's log since its last start: why a stack did not settle,
    kept in the failure message (the test's tmp dir, logs included, is gone a few sessions later). A restarted
    process appends to its predecessor's log, whose lines would otherwise pass for its own."""
    out = {}
    for log in sorted(stack.logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        starts = [k for k, ln in enumerate(lines) if STARTED in ln]
        since = lines[starts[-1]:] if starts else lines
        warned = [ln for ln in since if "WARNING" in ln or "ERROR" in ln]
        label = f"{log.stem} (start {len(starts)})" if len(starts) > 1 else log.stem
        if warned:
            out[label] = [ln[:300] for ln in warned[-per_log:]]
    return out


async def settled(stack: Stack, desired: dict[str, int]) -> Settling:
    """Every model has exactly its desired replicas, each RUNNING or PENDING with a reason."""
    insts = await stack.instances()
    per_model = Counter(i.model for i in insts)
    wrong = {m: (per_model.get(m, 0), n) for m, n in desired.items() if per_model.get(m, 0) != n}
    if wrong:
        return Settling(f"replicas (have, want) off for {len(wrong)} models: {dict(sorted(wrong.items())[:8])}", stack)
    stuck = [i for i in insts
             if not (i.state is InstanceState.RUNNING or (i.state is InstanceState.PENDING and i.reason))]
    if stuck:
        states = Counter(i.state.value for i in stuck)
        sample = [(i.id, i.state.value, i.worker) for i in stuck[:5]]
        return Settling(f"{len(stuck)} replicas neither RUNNING nor PENDING with a reason: {dict(states)}, "
                        f"e.g. {sample}", stack)
    return Settling()


async def assert_ledger_sound(stack: Stack) -> None:
    assert await stack.store.overbooked() == []
    assert await stack.store.claims_consistent() == []
    # Claims in the ledger are exactly those of the placed instances, GPU by GPU.
    expected: Counter[str] = Counter()
    for inst in await stack.instances():
        if inst.worker is not None and inst.state is not InstanceState.PENDING:
            for idx, claim in zip(inst.gpu_indexes, inst.vram_claims, strict=True):
                expected[f"{inst.worker}:{idx}"] += claim
    ledger = {f: used for f, (used, _) in (await stack.store.ledger()).items() if used}
    assert ledger == dict(expected)


async def start(stack: Stack, workers: int, gpus: int, replicas: int) -> None:
    """A fleet of quick workers and ``replicas`` of every service, ready."""
    stack.start_workers(
        "fleet", "--count", str(workers), "--gpus", str(gpus), "--heartbeat-interval", "0.5",
        "--start-delay", "0.1", "--download-delay", "0.1",
    )
    stack.start_services(replicas=replicas)
    await stack.wait_ready(workers=workers, timeout=60)


async def test_the_ledger_checker_has_stopped_when_its_block_ends(redis_server: ServerProcess) -> None:
    store = StateStore.from_url(redis_server.url)
    try:
        async with LedgerChecker(store) as checker:
            while checker.checks < 3:
                await asyncio.sleep(0.01)
        me = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not me and not t.done()] == []
    finally:
        await store.close()


async def test_a_ledger_check_that_fails_is_raised_when_its_block_ends() -> None:
    store = StateStore.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens: every poll fails
    try:
        with pytest.raises(AssertionError, match="ledger checker failed") as caught:
            async with LedgerChecker(store) as checker:
                await wait_until(lambda: _ended(checker), 30, "the failed poll")
        assert isinstance(caught.value.__cause__, RedisConnectionError)
    finally:
        await store.close()


async def _ended(checker: LedgerChecker) -> bool:
    return checker._task is not None and checker._task.done()


async def test_two_replicas_of_every_service_never_double_book(stack: Stack) -> None:
    await start(stack, workers=100, gpus=4, replicas=2)
    desired = {}
    async with LedgerChecker(stack.store) as checker:
        # 500 replicas in a burst: 25 LLMs (one GPU each) and 25 embedders (three fit on a GPU).
        sends = []
        for n in range(25):
            desired[f"llm{n}"] = 10
            desired[f"emb{n}"] = 10
            sends += [stack.scale(llm(n), 10), stack.scale(embedder(n), 10)]
        await asyncio.gather(*sends)
        await wait_until(lambda: settled(stack, desired), 150, "500 replicas RUNNING or PENDING", interval=0.5)
    assert checker.checks > 10 and checker.violations == []
    await assert_ledger_sound(stack)
    states = Counter(i.state for i in await stack.instances())
    print(f"settled: {dict(states)}; ledger checked {checker.checks} times")
    assert states[InstanceState.RUNNING] >= 400
    assert stack.crashed() == []


async def test_kill_9_of_each_service_during_bursts_loses_nothing(stack: Stack) -> None:
    await start(stack, workers=40, gpus=8, replicas=1)
    desired: dict[str, int] = {}
    async with LedgerChecker(stack.store) as checker:
        for round_, service in enumerate(SERVICE_COMMANDS):
            # 200 one-replica scale events over 20 models; the service dies halfway through the burst
            # (work in flight), the rest is sent while it is down, then it restarts.
            specs = [embedder(100 * round_ + n) for n in range(20)]
            desired.update({spec.name: 10 for spec in specs})
            for replicas in range(1, 11):
                await asyncio.gather(*(stack.scale(spec, replicas) for spec in specs))
                if replicas == 5:
                    stack.kill(f"{service}-0", signal.SIGKILL)
            await asyncio.sleep(0.3)
            stack.start_service(service, 0)
        await wait_until(lambda: settled(stack, desired), 120, "every replica placed after the crashes")
        states = Counter(i.state for i in await stack.instances())
        assert states == Counter({InstanceState.RUNNING: sum(desired.values())}), states
    assert checker.violations == []
    await assert_ledger_sound(stack)
    # Each worker reports exactly the instances the state places on it (no duplicate starts).
    placed = {i.id: i.worker for i in await stack.instances()}

    async def workers_agree() -> bool:
        reported = {}
        for w in await stack.store.workers():
            hb = await stack.store.r.hget("gantry:usage", w.name)
            for iid in msgspec.json.decode(hb, type=Heartbeat).instances if hb else ():
                reported[iid] = w.name
        return reported == placed

    await wait_until(workers_agree, 30, "worker heartbeats matching the state")
    assert stack.crashed() == []
