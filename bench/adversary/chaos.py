"""Chaos rounds against a real stack, and the invariant checker over their whole history.

A round issues randomized bursts of scale commands (up and down, past the cluster's capacity now and then)
and cordons, while NATS, Redis and every placement service are killed with SIGKILL at random moments and
started again (on the same port and data) after a random pause. A supervisor restarts whatever died on its
own meanwhile (a service that started while NATS was away). Throughout, a sampler reads the ledger in one
Redis transaction; after the round, with everything up and no more commands, the cluster must settle.

Invariants (the issue's wording):

- no acknowledged scale command is lost: at quiescence each model's desired replicas are those of its last
  acknowledged command (or of a later command whose acknowledgement was lost in a kill: JetStream may have
  stored it);
- the ledger is never over a GPU's capacity (every sample, and at the end);
- the ledger equals the instances: per GPU, claimed bytes are the sum of the claims of live instances, and an
  instance holds claims exactly when it is in a state that holds a GPU (every sample);
- at quiescence, within ``quiesce_s``: every replica RUNNING, or PENDING with a reason only when no worker
  has room for it (the placement core, run on the stored cluster, finds no place).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client

from ops.stack import LocalStack, WorkerFleet
from shared.bus import subjects
from shared.bus.messages import CordonCommand, ScaleCommand, encode
from shared.core.placement.domain import (
    GIB,
    Category,
    Decision,
    GpuSelector,
    InstanceState,
    ModelSpec,
    PlacementStrategy,
)
from shared.core.placement.pipeline import place
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig
from shared.host.feed import SnapshotFeed
from shared.settings import Settings
from shared.state.store import Keys, StateStore

SERVERS = ("nats", "redis")
SERVICES = ("filter", "fitting", "scoring", "reconciler")
HOLDING = {s.value for s in (InstanceState.SCHEDULED, InstanceState.STARTING, InstanceState.RUNNING,
                             InstanceState.DRAINING, InstanceState.ERROR)}

MODELS = (
    ModelSpec(name="cx-embed", source="x/embed", weight_bytes=4 * GIB, categories=(Category.EMBEDDING,),
              placement_strategy=PlacementStrategy.BINPACK),
    ModelSpec(name="cx-llm", source="x/llm", weight_bytes=16 * GIB),
    ModelSpec(name="cx-tp2", source="x/tp2", weight_bytes=100 * GIB, gpu_selector=GpuSelector(gpus_per_replica=2)),
)
MAX_REPLICAS = {"cx-embed": 24, "cx-llm": 12, "cx-tp2": 5}


@dataclass
class ChaosConfig:
    """Shape of a chaos run."""

    workers: int = 4
    gpus: int = 4
    round_s: float = 20.0
    quiesce_s: float = 30.0
    command_every_s: float = 0.25
    down_s: tuple[float, float] = (0.5, 3.0)  # how long a killed component stays down
    seed: int = 0


@dataclass
class Command:
    """A scale command as the driver saw it: acknowledged by JetStream, or not known to be."""

    model: str
    replicas: int
    acked: bool
    at: float


@dataclass
class RoundResult:
    """One round's figures and violations."""

    round: int
    commands: int = 0
    acked: int = 0
    unacked: int = 0
    cordons: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    lost_commands: list[str] = field(default_factory=list)
    overbooked: list[str] = field(default_factory=list)
    ledger_mismatch: list[str] = field(default_factory=list)
    quiesced_s: float | None = None
    pending_with_room: list[str] = field(default_factory=list)
    not_settled: list[str] = field(default_factory=list)
    pending_at_end: int = 0
    running_at_end: int = 0

    def ok(self) -> bool:
        """True when every invariant held."""
        return not (self.lost_commands or self.overbooked or self.ledger_mismatch or self.quiesced_s is None)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (violations capped to a few examples each)."""
        out = dataclasses.asdict(self)
        for key in ("lost_commands", "overbooked", "ledger_mismatch", "pending_with_room", "not_settled"):
            out[f"{key}_count"] = len(out[key])
            out[key] = out[key][:5]
        out["ok"] = self.ok()
        return out


async def ledger_violations(store: StateStore) -> tuple[list[str], list[str]]:
    """(over capacity, ledger != instances), read in one transaction so no commit lands between the reads."""
    pipe = store.r.pipeline(transaction=True)
    pipe.hgetall(Keys.gpu_used)
    pipe.hgetall(Keys.gpu_cap)
    pipe.hgetall(Keys.claims)
    pipe.hgetall(Keys.inst_state)
    used_raw, cap_raw, claims_raw, states_raw = await pipe.execute()
    used = {k.decode(): int(v) for k, v in used_raw.items()}
    cap = {k.decode(): int(v) for k, v in cap_raw.items()}
    over = [f"{f}: {u} > {cap[f]}" for f, u in used.items() if f in cap and u > cap[f]]
    over += [f"{f}: {u} claimed without a capacity" for f, u in used.items() if f not in cap and u]
    total: dict[str, int] = {}
    for spec in claims_raw.values():
        for part in spec.decode().split(";"):
            kind, fld, amount = part.split("|")
            if kind == "g":
                total[fld] = total.get(fld, 0) + int(amount)
    mismatch = [f"{f}: ledger {used.get(f, 0)} != claims {total.get(f, 0)}"
                for f in sorted(set(used) | set(total)) if used.get(f, 0) != total.get(f, 0)]
    states = {k.decode(): v.decode() for k, v in states_raw.items()}
    claimed = {k.decode() for k in claims_raw}
    mismatch += [f"{i}: claims while {states.get(i)}" for i in sorted(claimed) if states.get(i) not in HOLDING]
    mismatch += [f"{i}: {s} without claims" for i, s in sorted(states.items()) if s in HOLDING and i not in claimed]
    return over, mismatch


class Chaos:
    """Drives chaos rounds on a started ``LocalStack`` (servers its own, so they can be killed)."""

    def __init__(self, stack: LocalStack, cfg: ChaosConfig) -> None:
        self.stack = stack
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.down: dict[str, float] = {}  # component -> time it may come back
        self.commands: list[Command] = []
        self.nc: Client | None = None
        self.store = StateStore.from_url(stack.settings_for("admin").redis_url)
        self.replicas = dict.fromkeys(MAX_REPLICAS, 0)
        self.specs_sent: set[str] = set()
        self._seq = 0

    async def connect(self) -> None:
        """The driver's own NATS connection (reconnects forever, as the services do)."""
        async def quiet(_: Exception) -> None:  # NATS away is the point of the exercise: no log per retry
            return None

        self.nc = await nats.connect(
            self.stack.settings_for("admin").nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
            connect_timeout=2,
            error_cb=quiet,
        )

    async def close(self) -> None:
        """Close the driver's connections."""
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        await self.store.close()

    # -- faults ------------------------------------------------------------------------------------------

    def kill(self, component: str) -> None:
        """SIGKILL a server or a service; it stays down for a random pause."""
        if component in SERVERS:
            self.stack.kill_server(component)
        else:
            with contextlib.suppress(KeyError, ProcessLookupError):
                self.stack.kill(component)
        self.down[component] = time.monotonic() + self.rng.uniform(*self.cfg.down_s)

    def supervise(self, force: bool = False) -> None:
        """Restart what is down and due (everything when ``force``), and whatever died on its own."""
        now = time.monotonic()
        for component in (*SERVERS, *SERVICES):
            if not force and self.down.get(component, 0.0) > now:
                continue
            self.down.pop(component, None)
            if component in SERVERS:
                server = self.stack.nats if component == "nats" else self.stack.redis
                if server is None or not server.alive():
                    with contextlib.suppress(Exception):
                        self.stack.restart_server(component)
            else:
                with contextlib.suppress(KeyError, Exception):
                    if not self.stack.child(component).alive():
                        self.stack.restart(component)

    def all_up(self) -> bool:
        """Servers and services all running."""
        servers = all(s is not None and s.alive() for s in (self.stack.nats, self.stack.redis))
        return servers and all(self.stack.child(name).alive() for name in SERVICES)

    # -- commands ----------------------------------------------------------------------------------------

    async def _publish(self, subject: str, msg: msgspec.Struct) -> bool:
        assert self.nc is not None
        self._seq += 1
        try:
            await self.nc.jetstream().publish(
                subject, encode(msg), headers={"Nats-Msg-Id": f"chaos-{self.cfg.seed}-{self._seq}"}, timeout=2.0
            )
        except Exception:
            return False
        return True

    async def scale_burst(self) -> None:
        """One to five scale commands for random models (the first for a model carries its spec)."""
        for _ in range(self.rng.randint(1, 5)):
            spec = self.rng.choice(MODELS)
            replicas = self.rng.randint(0, MAX_REPLICAS[spec.name])
            cmd = ScaleCommand(model=spec.name, replicas=replicas, spec=spec)
            at = time.monotonic()
            acked = await self._publish(subjects.SCALE, cmd)
            self.commands.append(Command(spec.name, replicas, acked, at))

    async def cordon(self) -> bool:
        """Cordon or uncordon a random worker or GPU."""
        worker = f"w{self.rng.randrange(self.cfg.workers)}"
        gpu = self.rng.choice([None, self.rng.randrange(self.cfg.gpus)])
        return await self._publish(subjects.CORDON, CordonCommand(worker=worker, cordoned=self.rng.random() < 0.5,
                                                                  gpu_index=gpu))

    async def uncordon_all(self) -> None:
        """Lift every cordon (so quiescence is judged on the whole cluster)."""
        for w in range(self.cfg.workers):
            await self._publish(subjects.CORDON, CordonCommand(worker=f"w{w}", cordoned=False))
            for g in range(self.cfg.gpus):
                await self._publish(subjects.CORDON, CordonCommand(worker=f"w{w}", cordoned=False, gpu_index=g))

    # -- one round ---------------------------------------------------------------------------------------

    async def run_round(self, number: int) -> RoundResult:
        """Commands and kills for ``round_s``, then quiescence; the round's figures."""
        cfg = self.cfg
        result = RoundResult(round=number)
        first = len(self.commands)
        start = time.monotonic()
        kills = [(start + self.rng.uniform(0.1, 0.8) * cfg.round_s, c) for c in (*SERVERS, *SERVICES)]
        kills.sort()
        # until round_s has passed and every scheduled kill was made: a kill is only made between two steps of
        # commands, and on a loaded host one step (publishes timing out while NATS is down, a sample, a restart)
        # outlasted the last 20 % of the round, so the components due then were never killed
        while time.monotonic() - start < cfg.round_s or kills:
            now = time.monotonic()
            while kills and kills[0][0] <= now:
                _, component = kills.pop(0)
                self.kill(component)
                result.kills[component] = result.kills.get(component, 0) + 1
            self.supervise()
            if self.rng.random() < 0.8:
                await self.scale_burst()
            else:
                result.cordons += int(await self.cordon())
            await self.sample(result)
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * cfg.command_every_s)
        self.supervise(force=True)
        while not self.all_up():
            await asyncio.sleep(0.2)
            self.supervise(force=True)
        await self.uncordon_all()
        mine = self.commands[first:]
        result.commands = len(mine)
        result.acked = sum(c.acked for c in mine)
        result.unacked = result.commands - result.acked
        await self.quiesce(result)
        return result

    async def sample(self, result: RoundResult) -> None:
        """Check the ledger once (skipped while Redis is away)."""
        try:
            over, mismatch = await asyncio.wait_for(ledger_violations(self.store), 2.0)
        except Exception:
            return
        result.samples += 1
        result.overbooked += [f"t={time.monotonic():.1f} {v}" for v in over]
        result.ledger_mismatch += [f"t={time.monotonic():.1f} {v}" for v in mismatch]

    def expected(self) -> dict[str, set[int]]:
        """Per model, the desired replicas that lose no acknowledged command: the last acknowledged one's, or
        any later unacknowledged one's (JetStream may have stored it before the acknowledgement was lost)."""
        out: dict[str, set[int]] = {}
        for model in MAX_REPLICAS:
            mine = [c for c in self.commands if c.model == model]
            last = max((k for k, c in enumerate(mine) if c.acked), default=-1)
            allowed = {c.replicas for c in mine[last + 1:]}
            allowed.add(mine[last].replicas if last >= 0 else 0)
            out[model] = allowed
        return out

    async def quiesce(self, result: RoundResult) -> None:
        """Wait up to ``quiesce_s`` for every invariant of a settled cluster to hold at once."""
        start = time.monotonic()
        problems: list[str] = []
        while time.monotonic() - start < self.cfg.quiesce_s:
            self.supervise(force=True)
            try:
                problems, room, counts = await self.settled()
            except Exception as exc:  # a server still coming back
                problems, room, counts = [f"state unreadable: {exc}"], [], (0, 0)
            if not problems:
                result.quiesced_s = round(time.monotonic() - start, 2)
                result.running_at_end, result.pending_at_end = counts
                break
            await asyncio.sleep(0.5)
        else:
            result.not_settled = problems
            result.pending_with_room = room
        await self.sample(result)
        desired = await self.store.desired()
        for model, allowed in self.expected().items():
            if desired.get(model, 0) not in allowed:
                result.lost_commands.append(f"{model}: desired {desired.get(model, 0)}, expected one of {allowed}")

    async def settled(self) -> tuple[list[str], list[str], tuple[int, int]]:
        """(what is not settled yet, PENDING replicas for which a worker has room, (running, pending))."""
        problems: list[str] = []
        desired = await self.store.desired()
        for model, allowed in self.expected().items():
            if desired.get(model, 0) not in allowed:
                problems.append(f"{model}: desired {desired.get(model, 0)} not yet {sorted(allowed)}")
        instances = await self.store.instances()
        by_model: dict[str, list[Any]] = {}
        for inst in instances:
            by_model.setdefault(inst.model, []).append(inst)
        running = pending = 0
        pend_models: set[str] = set()
        for model in MAX_REPLICAS:
            mine = by_model.get(model, [])
            states = [i.state for i in mine]
            if len(mine) != desired.get(model, 0):
                problems.append(f"{model}: {len(mine)} instances, desired {desired.get(model, 0)}")
            others = [s.value for s in states if s not in (InstanceState.RUNNING, InstanceState.PENDING)]
            if others:
                problems.append(f"{model}: not settled ({', '.join(sorted(set(others)))})")
            for inst in mine:
                if inst.state is InstanceState.PENDING:
                    pending += 1
                    pend_models.add(model)
                    if not inst.reason:
                        problems.append(f"{inst.id}: PENDING without a reason")
                elif inst.state is InstanceState.RUNNING:
                    running += 1
        room: list[str] = []
        if pend_models:
            room = await self.room_for(sorted(pend_models))
            problems += [f"PENDING while a worker has room: {r}" for r in room]
        return problems, room, (running, pending)

    async def room_for(self, models: Sequence[str]) -> list[str]:
        """Models with a PENDING replica that the placement core can place on the stored cluster now."""
        s = self.stack.settings
        snapshot = ClusterSnapshot(SnapshotConfig(heartbeat_interval=s.heartbeat_interval_s,
                                                  not_ready_after=s.not_ready_after_s))
        await SnapshotFeed(snapshot).load(self.store)
        specs = {m.name: m for m in MODELS}
        out = []
        for model in models:
            verdict = place(snapshot, specs[model], time.time())
            if isinstance(verdict, Decision):  # there is room
                out.append(f"{model} fits on {verdict.candidate.worker}")
        return out


def chaos_settings(nats_port: int, redis_port: int) -> Settings:
    """Short timings so a round's faults are noticed and healed within seconds; JetStream on disk, so a
    killed NATS keeps every stored command."""
    return Settings(
        nats_url=f"nats://127.0.0.1:{nats_port}", redis_url=f"redis://127.0.0.1:{redis_port}/0",
        js_storage="file", heartbeat_interval_s=0.5, not_ready_after_s=3.0, reschedule_after_s=6.0,
        drain_timeout_s=2.0, ack_wait_s=2.0, reconcile_interval_s=0.25,
    )


def chaos_stack(home: Path, cfg: ChaosConfig, nats_port: int, redis_port: int) -> LocalStack:
    """The stack a chaos run drives: its own servers (to kill), the four services, an emulated fleet."""
    fleet = WorkerFleet(count=cfg.workers, gpus=cfg.gpus,
                        extra=("--heartbeat-interval", "0.5", "--start-delay", "0.2", "--download-delay", "0.2"))
    return LocalStack(chaos_settings(nats_port, redis_port), fleet, home=home)


async def run_chaos(
    home: Path, cfg: ChaosConfig, rounds: int, nats_port: int, redis_port: int,
    on_round: Callable[[int], None] | None = None,
) -> list[RoundResult]:
    """Start a chaos stack, wait for the fleet, run ``rounds`` rounds, stop; each round's result (``on_round``
    is told each round's number as it ends: the bench's progress)."""
    stack = await asyncio.to_thread(chaos_stack(home, cfg, nats_port, redis_port).start)
    chaos = Chaos(stack, cfg)
    try:
        await chaos.connect()
        deadline = time.monotonic() + 60
        while len(await chaos.store.worker_names()) < cfg.workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the fleet did not register")
            await asyncio.sleep(0.2)
        results = []
        for n in range(rounds):
            results.append(await chaos.run_round(n))
            if on_round is not None:
                on_round(n)
        return results
    finally:
        await chaos.close()
        await asyncio.to_thread(stack.stop, 10.0)
