"""Redis state layer.

Layout (all keys under ``gantry:``): worker inventories, last-seen times and latest usage (fed by
batched heartbeat writes; liveness is judged from the heartbeat age when read), cordons, model-file
readiness, model specs and desired replicas, instances (placement record, state, reason, worker), and
the claims ledger: per-GPU and per-worker-RAM capacity and claimed bytes plus each instance's claims.
Every ledger mutation is one Lua script, so a commit over several GPUs is all-or-nothing and a
redelivered commit is recognised (idempotent).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from shared.core.limits import MAX_ATTEMPTS, MAX_REPLICAS, bad_model_name, decimal
from shared.core.placement.domain import (
    Gpu,
    Instance,
    InstanceState,
    ModelFile,
    ModelSpec,
    UsageReport,
    Worker,
    WorkerUsage,
)
from shared.core.placement.lifecycle import ACTIVE
from shared.core.placement.records import read_worker
from shared.state.replay import call_key, prelude

if TYPE_CHECKING:  # the client is passed in: the CLI's read commands read through a lighter one (ops.cli)
    import redis.asyncio as aioredis

    from shared.state.lean import ScriptConnection

_LUA = Path(__file__).parent / "lua"
P = "gantry:"
log = logging.getLogger("gantry.state")
R = TypeVar("R")
CONVERGE_BUDGET = 500  # replicas one converge call creates at most: no script runs long, whatever the count
SCRIPT_CHUNK = 1000  # instances or reports per script call: every other script's work is bounded by this


def _micros(t: float) -> int:
    """A stream's creation time as the scripts compare it: whole microseconds, not negative."""
    return max(int(t * 1_000_000), 0) if math.isfinite(t) else 0


def _chunks(seq: Sequence[Any], size: int = SCRIPT_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


_COMMITTER = secrets.token_hex(8) + ":"  # this process's commit calls: unique across processes and restarts
_COMMIT_CALLS = itertools.count()


def commit_call() -> str:
    """A fresh name for one commit call (``StateStore.commit``), unique across processes and restarts."""
    return f"{_COMMITTER}{next(_COMMIT_CALLS)}"


class InvalidRecord(ValueError):
    """A record outside the limits of ``shared.core.limits``: the state layer refuses to store it."""


class Keys:
    """Redis key names (one place)."""

    workers = P + "workers"  # name -> Worker JSON (inventory)
    seen = P + "seen"  # name -> last heartbeat time (receiver clock)
    usage = P + "usage"  # name -> latest usage JSON (a heartbeat: WorkerUsage fields and more)
    cordon = P + "cordon"  # "worker" or "worker:gpu" -> "1"
    cordon_seq = P + "cordon:seq"  # "worker" or "worker:gpu" -> "seq:at" of the cordon command applied last
    files = P + "files"  # "source|worker" -> ModelFile JSON
    models = P + "models"  # name -> ModelSpec JSON
    desired = P + "desired"  # name -> replicas
    inst = P + "inst"  # id -> Instance JSON (placement record; state lives in inst_state)
    inst_state = P + "inst:state"
    inst_reason = P + "inst:reason"
    inst_worker = P + "inst:worker"
    model_index = P + "model:"  # + model -> set of instance ids
    # + model -> its active replicas (``lifecycle.ACTIVE`` states): the converge counts them without reading
    # every replica's state; every script that moves a state keeps it in step (``_tracking_lib``)
    model_active = P + "model-active:"
    model_pending = P + "model-pending:"  # + model -> ids that may be PENDING (a superset, pruned by the converge)
    model_tracked = P + "model-tracked"  # model -> "1" once its two sets above are kept (built at its first converge)
    lock = P + "lock:"  # + model -> converge lock token
    gpu_cap = P + "gpu:cap"  # "worker:index" -> VRAM capacity
    gpu_used = P + "gpu:used"  # "worker:index" -> claimed VRAM
    ram_cap = P + "ram:cap"  # worker -> RAM capacity
    ram_used = P + "ram:used"
    cpu_cap = P + "cpu:cap"  # worker -> milli-cores (absent: the worker reports no CPU count, never short)
    cpu_used = P + "cpu:used"  # worker -> claimed milli-cores
    claims = P + "claims"  # id -> "g|w:i|bytes;r|w|bytes;c|w|milli-cores"
    committed_by = P + "claims:by"  # id -> "<commit call>:<item>" that placed it (kept and released with claims)
    desired_seq = P + "desired:seq"  # model -> stream sequence of the scale command applied last
    desired_at = P + "desired:at"  # model -> "seq:at" of it: its stream's creation time (µs) beside its sequence
    drains = P + "drains"  # id -> time DRAINING began
    failures = P + "failures"  # id -> {"since": time, "message": str} of ERROR instances
    restarts = P + "restarts"  # model -> {"count": n, "last_at": time} of recent failed-replica replacements
    retries = P + "retries"  # id -> [attempts, next_at, requested_at] of PENDING replicas with a verdict
    registered = P + "workers:rev"  # revision of the last stored inventory (any worker): grows with every store
    # worker -> why its stored record is invalid today, as the state writer reported it (once per reason)
    invalid = P + "workers:invalid"
    replay = P + "replay:"  # + call -> a script call's reply, kept a while for a replay (``shared.state.replay``)


def _tracking_lib() -> str:
    """Lua prepended to every script that creates, moves or removes instance states: ``track`` keeps a model's
    active and PENDING sets in step with one instance's new state (nil: removed); ``model_of`` reads the model
    of a stored record."""
    active = ", ".join(f'["{s.value}"] = true' for s in sorted(ACTIVE, key=lambda s: s.value))
    return f"""local ACTIVE_STATES = {{{active}}}
local ACTIVE_PREFIX, PENDING_PREFIX, TRACKED = "{Keys.model_active}", "{Keys.model_pending}", "{Keys.model_tracked}"
local function track(model, id, new)
  if new and ACTIVE_STATES[new] then redis.call("SADD", ACTIVE_PREFIX .. model, id)
  else redis.call("SREM", ACTIVE_PREFIX .. model, id) end
  if new == "PENDING" then redis.call("SADD", PENDING_PREFIX .. model, id)
  else redis.call("SREM", PENDING_PREFIX .. model, id) end
end
local function model_of(record)
  if not record then return nil end
  return cjson.decode(record)["model"]
end
"""


def gpu_field(worker: str, index: int) -> str:
    """Ledger field of one GPU."""
    return f"{worker}:{index}"


@dataclass(frozen=True)
class CommitItem:
    """One decision to commit: the SCHEDULED record and every claim it makes.

    ``by`` names the item as a commit that failed (every reply lost) named it, when this is that commit's retry:
    if it did land, the item answers "ok" again (see ``StateStore.commit``); "" for a first attempt."""

    instance: Instance
    by: str = ""

    def claims(self) -> list[tuple[str, str, int]]:
        """(kind, field, amount) for every GPU (VRAM bytes), worker RAM (bytes) and worker CPU (milli-cores)
        the instance claims."""
        inst = self.instance
        assert inst.worker is not None
        out: list[tuple[str, str, int]] = [
            ("g", gpu_field(inst.worker, i), c) for i, c in zip(inst.gpu_indexes, inst.vram_claims, strict=True)
        ]
        ram: dict[str, int] = {}
        cpu: dict[str, int] = {}
        if inst.ram_claim:
            ram[inst.worker] = inst.ram_claim
        if inst.cpu_claim:
            cpu[inst.worker] = inst.cpu_claim
        for sub in inst.subordinates:
            out += [("g", gpu_field(sub.worker, i), c) for i, c in zip(sub.gpu_indexes, sub.vram_claims, strict=True)]
            if sub.ram_claim:
                ram[sub.worker] = ram.get(sub.worker, 0) + sub.ram_claim
            if sub.cpu_claim:
                cpu[sub.worker] = cpu.get(sub.worker, 0) + sub.cpu_claim
        out += [("r", w, b) for w, b in ram.items()]
        out += [("c", w, m) for w, m in cpu.items()]
        return out


@dataclass(frozen=True)
class Held:
    """A stored worker as a re-registration must respect it: its record (``worker`` None when it is outside
    today's limits), the exact stored bytes (to store a change only over them) and its live claims."""

    worker: Worker | None
    raw: bytes
    gpus: dict[int, int]  # GPU index -> VRAM claimed
    ram: int  # RAM claimed


@dataclass(frozen=True)
class ScaleUp:
    """One model for ``converge_up``: its latest scale command (if any) and the clock for new records."""

    model: str
    replicas: int | None = None  # None: no scale command, converge to the stored desired replicas
    spec: ModelSpec | None = None
    seq: int = 0  # stream sequence of the scale command (a later applied one wins)
    at: float = 0.0  # its stream's creation time: a later one wins too (a stream created again restarts its sequence)
    created_at: float = 0.0
    lock_token: str = ""  # the model's converge lock, when the caller holds it


@dataclass(frozen=True)
class ScaleUpResult:
    """What ``converge_up`` did for one model.

    ``status`` is "ok" (replicas created as needed), "busy" (another reconciler holds the model's converge
    lock: nothing done) or "down" (more active replicas than desired: the scale command was recorded,
    removing replicas is left to the locked path).
    """

    model: str
    status: str
    applied: bool
    desired: int
    created: tuple[Instance, ...]
    unrequested: tuple[str, ...]  # PENDING replicas without a reason (may need their request again)
    more: bool = False  # the call's creation budget ran out before this model had all its replicas


_enc = msgspec.json.Encoder()
_dec_worker = msgspec.json.Decoder(Worker)
_dec_inst = msgspec.json.Decoder(Instance)
_dec_spec = msgspec.json.Decoder(ModelSpec)
_dec_file = msgspec.json.Decoder(ModelFile)
_dec_usage = msgspec.json.Decoder(WorkerUsage)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _load(dec: msgspec.json.Decoder[R], raw: bytes | str, what: str) -> R | None:
    """A stored record, or None (logged) when it is outside today's limits: a record stored before a limit
    existed (or written past this layer) must not crash every reader of the state."""
    try:
        return dec.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        log.warning("ignoring a stored %s outside the limits: %s", what, exc)
        return None


def _worker(key: Any, raw: bytes | str) -> Worker | None:
    """A stored worker record, or None (logged) when it breaks today's limits (``records.read_worker``)."""
    got = read_worker(_s(key), raw)
    if isinstance(got, str):
        log.warning("ignoring the stored record of worker %r: %s", _s(key)[:64], got)
        return None
    return got


def _time(raw: Any, what: str) -> float:
    """A stored time, or 0.0 ("long ago", logged) when it is not a finite, non-negative number: a value written
    past this layer must not crash the reader (one bad entry stopped every periodic check), and an infinite
    last-seen time would keep a dead worker READY for ever."""
    try:
        t = float(raw)
    except (TypeError, ValueError):
        t = math.nan
    if math.isfinite(t) and t >= 0.0:
        return t
    log.warning("reading a stored %s of %r as long ago (not a finite time)", what, raw)
    return 0.0


def _record(raw: Any, what: str) -> dict[str, Any] | list[Any] | None:
    """A stored JSON bookkeeping record (an object or a list), or None (logged) when it is not one."""
    try:
        got = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError, TypeError):
        got = None
    if isinstance(got, dict | list):
        return got
    log.warning("ignoring a stored %s that is not a record: %r", what, raw[:80] if isinstance(raw, bytes) else raw)
    return None


def _state(raw: Any) -> InstanceState | None:
    """A stored instance state, or None (logged) when it is none of them."""
    try:
        return InstanceState(_s(raw))
    except ValueError:
        log.warning("ignoring a stored instance state that is none: %r", raw)
        return None


def _stored_instance(raw: Any, st: Any, reason: Any) -> Instance | None:
    """An instance from its stored record, state and reason, or None when it is not there or not readable (a
    record or state outside today's limits is left out, never raised: every service reads them all at start)."""
    if raw is None or st is None:
        return None
    inst = _load(_dec_inst, raw, "instance")
    state = _state(st)
    if inst is None or state is None:
        return None
    return msgspec.structs.replace(inst, state=state, reason=_s(reason) if reason is not None else None)


_REPLICAS_DIGITS = len(str(MAX_REPLICAS))


def _replicas(digits: str) -> int:
    """A stored count of ASCII digits, at most ``MAX_REPLICAS``: never converted whole when it is longer than
    that (``int`` refuses text of more than 4,300 digits, which raised out of every reader of the counts)."""
    significant = digits.lstrip("0")
    return MAX_REPLICAS if len(significant) > _REPLICAS_DIGITS else min(int(significant or "0"), MAX_REPLICAS)


def _checked(dec: msgspec.json.Decoder[Any], raw: bytes, what: str) -> bytes:
    """``raw`` if it decodes within the limits, else InvalidRecord: nothing outside them is stored."""
    try:
        dec.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRecord(f"refusing to store {what}: {exc}") from None
    return raw


class StateStore:
    """Typed access to Gantry's Redis state; every multi-key change is a Lua script."""

    def __init__(self, client: aioredis.Redis, scripts: ScriptConnection | None = None) -> None:
        self.r = client
        # Scripts (every ledger change) run over ``scripts`` when given: its client CPU per call is a fraction of
        # redis-py's (``shared.state.lean``); otherwise through ``client``.
        self.scripts = scripts
        register: Callable[[str], Any] = scripts.script if scripts is not None else client.register_script
        self._commit = register((_LUA / "commit.lua").read_text())
        tracking = _tracking_lib()  # scripts that move instance states keep the per-model sets in step
        # These answer a replay of a call (a retry after a lost reply) as its first run: their last key names the
        # call (``shared.state.replay``); the others are harmless run twice (docs/state.md, "Replays").
        replay = prelude()
        self._set_state = register(replay + tracking + (_LUA / "set_state.lua").read_text())
        self._create = register(replay + tracking + (_LUA / "create_pending.lua").read_text())
        self._mark = register(replay + tracking + (_LUA / "mark_state.lua").read_text())
        self._release = register(replay + tracking + (_LUA / "release.lua").read_text())
        self._unlock = register((_LUA / "unlock.lua").read_text())
        self._converge_up = register(replay + tracking + (_LUA / "converge_up.lua").read_text())
        self._forget_worker = register((_LUA / "forget_worker.lua").read_text())
        self._register = register(replay + (_LUA / "register.lua").read_text())
        self._cordon = register((_LUA / "cordon.lua").read_text())

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        """A store on a new connection pool to ``url``, its scripts on a lean connection of their own where the URL
        allows (``shared.state.lean``)."""
        import redis.asyncio as aioredis

        from shared.state.lean import ScriptConnection  # needs redis-py too: loaded only where a store connects
        from shared.state.resp import fast_packing

        return cls(fast_packing(aioredis.from_url(url)), ScriptConnection.from_url(url))

    async def close(self) -> None:
        """Close the connection pool and the scripts' connection."""
        if self.scripts is not None:
            await self.scripts.close()
        await self.r.aclose()

    # -- workers ------------------------------------------------------------------------------------

    async def register_workers(
        self, workers: Sequence[Worker], seen_at: float | None = None,
        expected: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, str]:
        """Store inventories and their ledger capacity (GPUs that left lose theirs), each worker in one step; with
        ``seen_at``, a registration counts as hearing from the worker (so a worker that never heartbeats still
        ages, and is not taken for silent since 1970).

        Per worker the verdict: the revision stored (decimal), "stale" when ``expected`` names the stored record
        the change was checked against (None: none) and another is stored now, or "held:<field>" when a GPU's
        capacity would leave or change, or the RAM fall below its claims, under a live claim (never written).
        """
        if not workers:
            return {}
        keys = [Keys.workers, Keys.gpu_cap, Keys.gpu_used, Keys.ram_cap, Keys.ram_used, Keys.seen, Keys.registered,
                Keys.cpu_cap, Keys.cpu_used]
        out: dict[str, str] = {}
        for part in _chunks(workers, SCRIPT_CHUNK // 10):  # up to MAX_GPUS_PER_WORKER fields each
            args: list[Any] = ["" if seen_at is None else repr(seen_at)]
            for w in part:
                record = _checked(_dec_worker, _enc.encode(w), f"worker {w.name[:64]!r}")
                want = "*" if expected is None or w.name not in expected else (expected[w.name] or b"-")
                args += [w.name, want, record, w.ram_total, max(w.cpu_total, 0), len(w.gpus)]
                for g in w.gpus:
                    args += [gpu_field(w.name, g.index), g.vram_total]
            verdicts = await self._register(keys=[*keys, call_key(Keys.replay)], args=args)
            out.update({w.name: _s(v) for w, v in zip(part, verdicts, strict=True)})
        return out

    async def registration_revision(self) -> int:
        """The revision of the last inventory stored: every stored inventory up to it is in ``workers()`` read
        after this call."""
        return int(await self.r.get(Keys.registered) or 0)

    async def stored_inventory(self, name: str) -> tuple[int, Worker | None]:
        """``name``'s stored inventory (None: not stored) and a revision it is at least as new as: every inventory
        stored up to that revision is in it (read first, in the same round trip), as ``registration_revision``
        is for ``workers()``."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(Keys.registered)
        pipe.hget(Keys.workers, name)
        revision, raw = await pipe.execute()
        return int(revision or 0), (_worker(name, raw) if raw else None)

    async def held(self, names: Sequence[str]) -> dict[str, Held]:
        """Each stored worker's record and what the ledger holds claimed on its GPUs and RAM (workers not stored
        yet are left out): what a new registration of theirs may not take away."""
        if not names:
            return {}
        raws = await self.r.hmget(Keys.workers, list(names))
        stored = {name: raw for name, raw in zip(names, raws, strict=True) if raw}
        if not stored:
            return {}
        workers = {name: _worker(name, raw) for name, raw in stored.items()}
        fields = [gpu_field(w.name, g.index) for w in workers.values() if w is not None for g in w.gpus]
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(Keys.gpu_used, fields or ["-"])
        pipe.hmget(Keys.ram_used, list(stored))
        gpu_used, ram_used = await pipe.execute()
        used = iter(gpu_used)
        out: dict[str, Held] = {}
        for (name, raw), ram in zip(stored.items(), ram_used, strict=True):
            w = workers[name]
            gpus = {g.index: int(next(used) or 0) for g in w.gpus} if w is not None else {}
            record = raw if isinstance(raw, bytes) else raw.encode()
            out[name] = Held(worker=w, raw=record, gpus=gpus, ram=int(ram or 0))
        return out

    async def record_heartbeats(self, beats: Sequence[tuple[UsageReport, float]]) -> None:
        """Batched write of (heartbeat, receive time): last-seen and latest usage, one round trip."""
        if not beats:
            return
        usage = {
            hb.worker: _checked(_dec_usage, _enc.encode(hb), f"heartbeat of {hb.worker[:64]!r}") for hb, _ in beats
        }
        seen = {hb.worker: repr(t) for hb, t in beats if math.isfinite(t)}
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(Keys.seen, mapping=seen)  # type: ignore[arg-type]
        pipe.hset(Keys.usage, mapping=usage)  # type: ignore[arg-type]
        await pipe.execute()

    async def workers(self) -> list[Worker]:
        """Every known worker: inventory + last heartbeat + latest usage + cordons applied (a record that breaks
        today's limits is left out: ``worker_records`` says which and why)."""
        return (await self.worker_records())[0]

    async def worker_records(self) -> tuple[list[Worker], dict[str, str]]:
        """Every known worker, as ``workers``, and each stored record left out as invalid today: worker -> the
        one-line reason. One bad record never hides the good ones."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(Keys.workers)
        pipe.hgetall(Keys.seen)
        pipe.hgetall(Keys.usage)
        pipe.hgetall(Keys.cordon)
        inv, seen, usage, cordon = await pipe.execute()
        cordoned = {_s(k) for k in cordon}
        out = []
        invalid: dict[str, str] = {}
        for name_b, raw in inv.items():
            w = read_worker(_s(name_b), raw)
            if isinstance(w, str):
                invalid[_s(name_b)] = w
                continue
            hb_raw = usage.get(name_b)
            hb = _load(_dec_usage, hb_raw, "heartbeat") if hb_raw else None
            last = _time(seen.get(name_b, 0.0) or 0.0, "last-seen time")
            out.append(apply_usage(w, hb, last, cordoned))
        return sorted(out, key=lambda w: w.name), invalid

    async def invalid_workers(self, names: Sequence[str]) -> dict[str, str]:
        """Of the stored records of ``names`` (absent ones left out), each invalid today: worker -> why."""
        if not names:
            return {}
        raws = await self.r.hmget(Keys.workers, list(names))
        got = {name: read_worker(name, raw) for name, raw in zip(names, raws, strict=True) if raw is not None}
        return {name: why for name, why in got.items() if isinstance(why, str)}

    async def reported_invalid(self) -> dict[str, str]:
        """Invalid stored records already reported: worker -> the reason reported."""
        return {_s(k): _s(v) for k, v in (await self.r.hgetall(Keys.invalid)).items()}

    async def mark_reported(self, report: Mapping[str, str], forget: Sequence[str]) -> None:
        """Remember the invalid records reported (so each is reported once), forget those since repaired or gone."""
        pipe = self.r.pipeline(transaction=False)
        if report:
            pipe.hset(Keys.invalid, mapping=dict(report))  # type: ignore[arg-type]
        if forget:
            pipe.hdel(Keys.invalid, *forget)
        await pipe.execute()

    async def worker_names(self) -> set[str]:
        """Names of registered workers."""
        return {_s(k) for k in await self.r.hkeys(Keys.workers)}

    async def set_cordon(
        self, worker: str, cordoned: bool, gpu_index: int | None = None, seq: int = 0, at: float = 0.0
    ) -> bool:
        """Cordon or uncordon a worker (or one GPU of it) as the command at stream sequence ``seq`` of the command
        stream created at ``at`` says; False (and nothing written) when a newer command for it was applied already
        (``cordon.lua``)."""
        field = worker if gpu_index is None else gpu_field(worker, gpu_index)
        flag = "1" if cordoned else "0"
        return bool(await self._cordon(keys=[Keys.cordon, Keys.cordon_seq], args=[field, flag, seq, _micros(at)]))

    async def cordons(self) -> set[str]:
        """Cordoned workers ("w") and GPUs ("w:i")."""
        return {_s(k) for k in await self.r.hkeys(Keys.cordon)}

    # -- model files -------------------------------------------------------------------------------

    async def set_model_files(self, files: Iterable[ModelFile]) -> None:
        """Record readiness of model files (batched)."""
        mapping = {f"{f.source}|{f.worker}": _checked(_dec_file, _enc.encode(f), "model file") for f in files}
        if mapping:
            await self.r.hset(Keys.files, mapping=mapping)  # type: ignore[arg-type]

    async def model_files(self) -> list[ModelFile]:
        """Every known (source, worker) readiness."""
        got = (_load(_dec_file, v, "model file") for v in (await self.r.hgetall(Keys.files)).values())
        return [f for f in got if f is not None]

    # -- models --------------------------------------------------------------------------------------

    async def set_model(self, spec: ModelSpec | None, model: str, replicas: int) -> None:
        """Store a model's spec (when given) and desired replicas."""
        if bad_model_name(model) or not 0 <= replicas <= MAX_REPLICAS:
            raise InvalidRecord(f"refusing to store model {model[:64]!r} with {replicas} replicas")
        pipe = self.r.pipeline(transaction=True)
        if spec is not None:
            pipe.hset(Keys.models, model, _checked(_dec_spec, _enc.encode(spec), f"spec of {model!r}"))
        pipe.hset(Keys.desired, model, replicas)
        await pipe.execute()

    async def model(self, name: str) -> ModelSpec | None:
        """The stored spec of a model, if known."""
        raw = await self.r.hget(Keys.models, name)
        return _load(_dec_spec, raw, "model spec") if raw else None

    async def models(self) -> dict[str, ModelSpec]:
        """Every stored spec by model name."""
        got = {_s(k): _load(_dec_spec, v, "model spec") for k, v in (await self.r.hgetall(Keys.models)).items()}
        return {k: v for k, v in got.items() if v is not None}

    async def desired(self) -> dict[str, int]:
        """Desired replicas by model name."""
        raw = await self.r.hgetall(Keys.desired)
        got = {_s(k): _s(v) for k, v in raw.items()}
        # A negative count reads as 0, as it always did; text that is no count ("--5", "²") is left out.
        return {k: 0 if v.startswith("-") else _replicas(v) for k, v in got.items() if decimal(v.removeprefix("-"))}

    # -- instances -------------------------------------------------------------------------------------

    async def instances(self, model: str | None = None) -> list[Instance]:
        """Instances (of one model, or all), with their current state and reason."""
        if model is not None:
            return sorted(await self._read(sorted(await self.r.smembers(Keys.model_index + model))),
                          key=lambda i: i.id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(Keys.inst)
        pipe.hgetall(Keys.inst_state)
        pipe.hgetall(Keys.inst_reason)
        recs, states, reasons = await pipe.execute()
        got = (_stored_instance(raw, states.get(i), reasons.get(i)) for i, raw in recs.items())
        return sorted((i for i in got if i is not None), key=lambda i: i.id)

    async def _read(self, ids: list[Any]) -> list[Instance]:
        """Those of ``ids`` that exist and are readable, with their current state and reason (one round trip)."""
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(Keys.inst, ids)
        pipe.hmget(Keys.inst_state, ids)
        pipe.hmget(Keys.inst_reason, ids)
        raws, sts, rs = await pipe.execute()
        got = (_stored_instance(raw, st, reason) for raw, st, reason in zip(raws, sts, rs, strict=True))
        return [i for i in got if i is not None]

    async def states(self, ids: Sequence[str]) -> dict[str, InstanceState]:
        """The current state of each of ``ids`` that exists (one round trip)."""
        if not ids:
            return {}
        raw = await self.r.hmget(Keys.inst_state, list(ids))
        got = {i: _state(v) for i, v in zip(ids, raw, strict=True) if v is not None}
        return {i: st for i, st in got.items() if st is not None}

    async def reasons(self, ids: Sequence[str]) -> dict[str, str]:
        """The stored reason of each of ``ids`` that has one (one round trip)."""
        if not ids:
            return {}
        raw = await self.r.hmget(Keys.inst_reason, list(ids))
        return {i: _s(v) for i, v in zip(ids, raw, strict=True) if v is not None}

    async def instance(self, instance_id: str) -> Instance | None:
        """One instance with its current state, or None."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(Keys.inst, instance_id)
        pipe.hget(Keys.inst_state, instance_id)
        pipe.hget(Keys.inst_reason, instance_id)
        raw, st, reason = await pipe.execute()
        return _stored_instance(raw, st, reason)

    async def instances_by_id(self, ids: Sequence[str]) -> dict[str, Instance]:
        """Those of ``ids`` that exist, with their current state (one round trip, however many ids: a report
        batch names up to 20,000, and one read each took the status consumer seconds)."""
        return {inst.id: inst for inst in await self._read(list(dict.fromkeys(ids)))}

    async def set_reasons(self, reasons: dict[str, str]) -> None:
        """Keep the latest reason of PENDING instances (one round trip)."""
        if reasons:
            await self.r.hset(Keys.inst_reason, mapping=reasons)  # type: ignore[arg-type]

    async def mark_drains(self, ids: Sequence[str], at: float) -> None:
        """Remember when instances began DRAINING (for the drain timeout)."""
        if ids:
            await self.r.hset(Keys.drains, mapping=dict.fromkeys(ids, repr(at)))

    async def drains(self) -> dict[str, float]:
        """Instances DRAINING and since when."""
        return {_s(k): _time(v, "drain start") for k, v in (await self.r.hgetall(Keys.drains)).items()}

    async def forget_drains(self, ids: Sequence[str]) -> None:
        """Drop drain bookkeeping of removed instances."""
        if ids:
            await self.r.hdel(Keys.drains, *ids)

    async def record_failures(self, failures: dict[str, tuple[float, str]]) -> None:
        """Remember when (and why) instances went ERROR; the first report wins (redeliveries keep it)."""
        if not failures:
            return
        pipe = self.r.pipeline(transaction=False)
        for iid, (since, message) in failures.items():
            pipe.hsetnx(Keys.failures, iid, _enc.encode({"since": since, "message": message}))
        await pipe.execute()

    async def failures(self) -> dict[str, tuple[float, str]]:
        """ERROR instances: (since, message). A record that is not one reads as failed long ago (never as
        failing now again: the first record is kept, so that would put its replacement off for ever)."""
        out = {}
        for k, v in (await self.r.hgetall(Keys.failures)).items():
            d = _record(v, "failure")
            got = d if isinstance(d, dict) else {}
            out[_s(k)] = (_time(got.get("since"), "failure time"), str(got.get("message", ""))[:1024])
        return out

    async def forget_failures(self, ids: Sequence[str]) -> None:
        """Drop failure bookkeeping of removed instances."""
        if ids:
            await self.r.hdel(Keys.failures, *ids)

    async def set_restarts(self, restarts: dict[str, tuple[int, float]]) -> None:
        """Per model: how many failed replicas were replaced lately, the last one when."""
        if restarts:
            mapping = {m: _enc.encode({"count": c, "last_at": t}) for m, (c, t) in restarts.items()}
            await self.r.hset(Keys.restarts, mapping=mapping)  # type: ignore[arg-type]

    async def restarts(self) -> dict[str, tuple[int, float]]:
        """Per model: (count, last replacement time); a record that is not one is left out (the count starts
        again)."""
        out = {}
        for k, v in (await self.r.hgetall(Keys.restarts)).items():
            d = _record(v, "restart count")
            count = d.get("count") if isinstance(d, dict) else None
            if isinstance(count, int) and 0 <= count <= MAX_ATTEMPTS:
                out[_s(k)] = (count, _time(d.get("last_at") if isinstance(d, dict) else None, "restart time"))
        return out

    async def set_retries(self, retries: dict[str, tuple[int, float, float]]) -> None:
        """When each PENDING replica is next placed again (shared by every reconciler replica)."""
        if retries:
            mapping = {i: _enc.encode([a, n, r if r != float("-inf") else None]) for i, (a, n, r) in retries.items()}
            await self.r.hset(Keys.retries, mapping=mapping)  # type: ignore[arg-type]

    async def retries(self, ids: Sequence[str] | None = None) -> dict[str, tuple[int, float, float]]:
        """The retry book (of ``ids``, or all): attempts, next time, last request time (-inf: never)."""
        if ids is None:
            raw = {_s(k): v for k, v in (await self.r.hgetall(Keys.retries)).items()}
        elif ids:
            raw = {i: v for i, v in zip(ids, await self.r.hmget(Keys.retries, list(ids)), strict=True) if v}
        else:
            raw = {}
        out = {}
        for iid, v in raw.items():  # a record that is not one is left out: the replica is retried as if new
            d = _record(v, "retry")
            if not (isinstance(d, list) and len(d) == 3 and isinstance(d[0], int) and 0 <= d[0] <= MAX_ATTEMPTS):
                continue
            a, n, r = d
            out[iid] = (a, _time(n, "retry time"), float("-inf") if r is None else _time(r, "retry request time"))
        return out

    async def forget_retries(self, ids: Sequence[str]) -> None:
        """Drop retry bookkeeping of replicas no longer PENDING."""
        if ids:
            await self.r.hdel(Keys.retries, *ids)

    async def forget_worker(self, name: str, cutoff: float | None) -> str:
        """Remove a worker from the state in one step: "ok"; "alive" if heard after ``cutoff``; "holds" if
        claims remain on it (release its instances first). ``cutoff`` None skips the liveness check."""
        raw = await self.r.hget(Keys.workers, name)
        stored = read_worker(name, raw) if raw else None
        if isinstance(stored, str):
            # A record that breaks today's limits names no GPUs one can trust: take the ledger's own fields of the
            # worker, so its capacity leaves with it (and claims on any of them still refuse the removal).
            found = self.r.hscan_iter(Keys.gpu_cap, match=_glob_prefix(name + ":"), count=1000)
            gpus = [_s(k) async for k, _ in found]
            gpus = [g for g in gpus if g.rpartition(":")[0] == name and decimal(g.rpartition(":")[2])]
        else:
            gpus = [gpu_field(name, g.index) for g in stored.gpus] if stored else []
        files = [_s(k) async for k, _ in self.r.hscan_iter(Keys.files, match=_glob_escape("|" + name), count=1000)]
        files = [f for f in files if f.rsplit("|", 1)[-1] == name]
        keys = [Keys.workers, Keys.seen, Keys.usage, Keys.cordon, Keys.gpu_cap, Keys.gpu_used, Keys.ram_cap,
                Keys.ram_used, Keys.files, Keys.cpu_cap, Keys.cpu_used, Keys.cordon_seq]
        args: list[Any] = [name, "" if cutoff is None else repr(cutoff), len(gpus), *gpus, *files]
        return _s(await self._forget_worker(keys=keys, args=args))

    async def try_lock(self, name: str, ttl_s: float) -> bool:
        """A plain expiring lock (e.g. one reconciler replica runs a periodic check)."""
        return bool(await self.r.set(P + "tlock:" + name, "1", nx=True, px=max(1, int(ttl_s * 1000))))

    # -- converge lock and fenced writes --------------------------------------------------------------

    async def lock_model(self, model: str, ttl_s: float = 5.0) -> str | None:
        """Take the model's converge lock; a token, or None if another reconciler holds it."""
        token = secrets.token_hex(8)
        ok = await self.r.set(Keys.lock + model, token, nx=True, px=int(ttl_s * 1000))
        return token if ok else None

    async def unlock_model(self, model: str, token: str) -> None:
        """Release the lock if still ours."""
        await self._unlock(keys=[Keys.lock + model], args=[token])

    async def converge_up(self, models: Sequence[ScaleUp], active: Iterable[InstanceState]) -> list[ScaleUpResult]:
        """Record scale commands and create missing PENDING replicas for many models in one atomic call.

        Instance ids are ``<model>-<random hex><counter>``; a model locked by someone else (being scaled
        down elsewhere, or a lock the caller lost) is skipped.
        """
        if not models:
            return []
        if frozenset(active) != ACTIVE:  # the per-model active sets every script keeps count lifecycle.ACTIVE
            raise ValueError("converge_up counts the lifecycle's ACTIVE states only")
        for m in models:
            problem = bad_model_name(m.model) or (
                None if m.replicas is None or 0 <= m.replicas <= MAX_REPLICAS
                else f"replicas of {m.model} out of range: {m.replicas} (0..{MAX_REPLICAS})"
            )
            if problem:
                raise InvalidRecord(problem)
        results = {m.model: r for m, r in zip(models, await self._converge_once(models, active), strict=True)}
        # Each call creates at most CONVERGE_BUDGET replicas: go on for the models left short.
        while short := [m for m in models if results[m.model].more]:
            again = [dataclasses.replace(m, replicas=None, spec=None) for m in short]
            for m, res in zip(short, await self._converge_once(again, active), strict=True):
                prev = results[m.model]
                results[m.model] = dataclasses.replace(
                    res, applied=prev.applied, created=prev.created + res.created,
                    unrequested=tuple(sorted(set(prev.unrequested) | set(res.unrequested))),
                )
        return [results[m.model] for m in models]

    async def _converge_once(self, models: Sequence[ScaleUp], active: Iterable[InstanceState]) -> list[ScaleUpResult]:
        args: list[Any] = [",".join(s.value for s in active), len(models), CONVERGE_BUDGET, MAX_REPLICAS]
        keys = [Keys.desired, Keys.desired_seq, Keys.models, Keys.inst, Keys.inst_state, Keys.inst_reason,
                Keys.desired_at]
        for m in models:
            head, tail = _record_template(m.model, m.created_at)
            spec = _enc.encode(m.spec) if m.spec is not None else b""
            replicas = -1 if m.replicas is None else m.replicas
            prefix = f"{m.model}-{secrets.token_hex(4)}"
            # The script splices ids into the record's JSON: the prefix goes in escaped (a model name may
            # hold quotes or backslashes); the hex counter after it never needs escaping.
            prefix_json = _enc.encode(prefix)[1:-1]
            args += [m.model, replicas, spec, m.seq, _micros(m.at), prefix, prefix_json, head, tail, m.lock_token]
            keys += [Keys.lock + m.model, Keys.model_index + m.model]
        keys.append(call_key(Keys.replay))
        # One JSON string (see the script): an empty Lua table reads as {}, whose iteration is empty too.
        raw = msgspec.json.decode(await self._converge_up(keys=keys, args=args))
        out = []
        for m, (status, applied, desired, created, unrequested, more) in zip(models, raw, strict=True):
            out.append(ScaleUpResult(
                model=m.model, status=str(status), applied=bool(int(applied)), desired=int(desired),
                created=tuple(Instance(id=str(i), model=m.model, created_at=m.created_at) for i in created),
                unrequested=tuple(sorted(str(i) for i in unrequested)), more=bool(int(more)),
            ))
        return out

    async def create_pending(self, model: str, token: str, instances: Sequence[Instance]) -> bool:
        """Create PENDING instances under the lock (a chunk per call, each fenced by the lock); False if the
        lock was lost (nothing written from then on)."""
        for part in _chunks(instances) if instances else [()]:
            args: list[Any] = [token, model]
            for inst in part:
                args += [inst.id, _enc.encode(inst)]
            made = await self._create(
                keys=[Keys.lock + model, Keys.model_index + model, Keys.inst, Keys.inst_state, call_key(Keys.replay)],
                args=args,
            )
            if int(made) < 0:
                return False
        return True

    async def mark_state(
        self, model: str, token: str, state: InstanceState, allowed: Iterable[InstanceState], ids: Sequence[str]
    ) -> list[str] | None:
        """Move ``ids`` currently in ``allowed`` states to ``state`` under the lock: the ids moved, or None if the
        lock was lost (then a part may have moved: the caller's plan is void, the next converge plans again)."""
        moved: list[str] = []
        for part in _chunks(ids):
            args = [token, state.value, ",".join(s.value for s in allowed), model, *part]
            got = await self._mark(keys=[Keys.lock + model, Keys.inst_state, call_key(Keys.replay)], args=args)
            if not isinstance(got, list):  # -1: the token no longer holds the lock
                return None
            moved += [_s(v) for v in got]
        return moved

    # -- ledger ---------------------------------------------------------------------------------------

    async def commit(self, items: Sequence[CommitItem], *, call: str | None = None) -> list[str]:
        """Commit decisions: per item "ok", "dup", "gone", "full:<field>" (see commit.lua) or "invalid:<why>"
        (a record outside the limits: never written).

        ``call`` names this commit (a fresh random one by default). The same call sent again (the client retries
        a script whose connection failed after the write: it cannot know whether the script ran) answers "ok"
        for what the first run committed, as the first run did; any other call answers "dup" for it. Item ``n`` of
        the call is named "<call>:<n>" among the items with a valid record, unless it has a ``by`` of its own: a
        caller retrying a call that failed outright gives each item the name it had in that call (``by``), so
        that what the failed call committed answers "ok" again."""
        call = call or commit_call()
        verdicts: list[str | None] = [None] * len(items)
        calls: list[list[Any]] = []  # one item's arguments each
        for n, it in enumerate(items):
            claims = it.claims()
            try:
                record = _checked(_dec_inst, _enc.encode(it.instance), f"instance {it.instance.id[:64]!r}")
            except InvalidRecord as exc:
                verdicts[n] = f"invalid:{exc}"
                continue
            one: list[Any] = [it.instance.id, it.by, it.instance.worker, record, len(claims)]
            for kind, field, amount in claims:
                one += [kind, field, amount]
            calls.append(one)
        keys = [
            Keys.gpu_cap, Keys.gpu_used, Keys.ram_cap, Keys.ram_used, Keys.claims,
            Keys.inst, Keys.inst_state, Keys.inst_reason, Keys.inst_worker, Keys.cpu_cap, Keys.cpu_used,
            Keys.committed_by,
        ]
        got: list[str] = []
        for base, part in zip(range(0, len(calls), SCRIPT_CHUNK), _chunks(calls), strict=True):
            args: list[Any] = [len(part), call, base]
            for one in part:
                args += one
            got += [_s(v) for v in await self._commit(keys=keys, args=args)]
        answers = iter(got)
        return [v if v is not None else next(answers) for v in verdicts]

    async def release(self, ids: Sequence[str], mode: str = "remove") -> int:
        """Free the claims of ``ids`` (idempotent) and remove them, or set them to state ``mode``."""
        return sum([int(await self._release(keys=self._release_keys(), args=[mode, *part])) for part in _chunks(ids)])

    @staticmethod
    def _release_keys() -> list[str]:
        return [Keys.gpu_used, Keys.ram_used, Keys.claims, Keys.inst, Keys.inst_state, Keys.inst_reason,
                Keys.inst_worker, Keys.model_index, Keys.cpu_used, Keys.committed_by, call_key(Keys.replay)]

    async def remove_pending(self, ids: Sequence[str]) -> list[str]:
        """Remove those of ``ids`` still PENDING (one committed meanwhile stays): the ids removed."""
        out: list[str] = []
        for part in _chunks(ids):
            out += [_s(v) for v in await self._release(keys=self._release_keys(), args=["remove_pending", *part])]
        return out

    async def set_states(self, reports: Sequence[tuple[str, str, InstanceState]]) -> list[InstanceState | None]:
        """Apply (instance id, worker, state) reports in order, in one call; each one's previous state or None."""
        out: list[InstanceState | None] = []
        for part in _chunks(reports):
            args = [v for iid, worker, state in part for v in (iid, worker, state.value)]
            keys = [Keys.inst_state, Keys.inst_worker, Keys.inst, call_key(Keys.replay)]
            raw = await self._set_state(keys=keys, args=args)
            out += [_state(p) if _s(p) else None for p in raw]
        return out

    async def ledger(self) -> dict[str, tuple[int, int]]:
        """GPU field -> (claimed, capacity) for every GPU with a capacity."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(Keys.gpu_used)
        pipe.hgetall(Keys.gpu_cap)
        used, cap = await pipe.execute()
        return {_s(k): (int(used.get(k, 0)), int(v)) for k, v in cap.items()}

    async def overbooked(self) -> list[str]:
        """GPUs whose claims exceed capacity (must always be empty)."""
        return [f"{f}: {u} > {c}" for f, (u, c) in (await self.ledger()).items() if u > c]

    async def claims_consistent(self) -> list[str]:
        """GPUs whose claimed total differs from the sum of live instance claims (must be empty)."""
        raw = await self.r.hgetall(Keys.claims)
        total: dict[str, int] = {}
        for spec in raw.values():
            for part in _s(spec).split(";"):
                kind, field, amount = part.split("|")
                if kind == "g":
                    total[field] = total.get(field, 0) + int(amount)
        used = {_s(k): int(v) for k, v in (await self.r.hgetall(Keys.gpu_used)).items()}
        fields = set(total) | {f for f, v in used.items() if v}
        return [f"{f}: ledger {used.get(f, 0)} != claims {total.get(f, 0)}" for f in sorted(fields)
                if used.get(f, 0) != total.get(f, 0)]


def _glob_prefix(prefix: str) -> str:
    """A HSCAN pattern matching fields that start with ``prefix`` literally."""
    return _glob_escape(prefix)[1:] + "*"


def _glob_escape(suffix: str) -> str:
    """A HSCAN pattern matching fields that end with ``suffix`` literally."""
    return "*" + "".join("\\" + ch if ch in "*?[]\\" else ch for ch in suffix)


_ID_MARK = "\x00"


def _record_template(model: str, created_at: float) -> tuple[bytes, bytes]:
    """A new PENDING record's JSON split around its id (the script splices each new id in)."""
    raw = _enc.encode(Instance(id=_ID_MARK, model=model, created_at=created_at))
    marker = _enc.encode(_ID_MARK)[1:-1]
    head, _, tail = raw.partition(marker)
    return head, tail


def apply_usage(w: Worker, hb: UsageReport | None, last: float, cordoned: set[str]) -> Worker:
    """A worker's inventory overlaid with its latest usage, heartbeat time and cordons."""
    used = {g.index: g.vram_used for g in hb.gpus} if hb else {}
    gpus = tuple(
        msgspec.structs.replace(
            g,
            vram_used=used.get(g.index, g.vram_used),
            schedulable=g.schedulable and gpu_field(w.name, g.index) not in cordoned,
        )
        for g in w.gpus
    )
    return msgspec.structs.replace(
        w,
        gpus=gpus,
        ram_used=hb.ram_used if hb else w.ram_used,
        last_heartbeat=last,
        cordoned=w.cordoned or w.name in cordoned,
    )


__all__ = ["CommitItem", "Gpu", "Held", "Keys", "StateStore", "apply_usage", "gpu_field"]
