"""The CLI's side of the bus: read cluster state through the state layer, publish declared commands.

Reads go through ``shared.state.StateStore`` (the same Redis layer the services write); commands are
the declared messages of ``shared.bus.messages`` published on the subjects of ``shared.bus.subjects``
with a dedupe id, exactly as any other producer would send them.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec

from ops.cli.connect import connect_nats
from ops.cli.errors import CliError, quoted
from ops.cli.inputs import read_input_file, worker_name
from ops.view import ClusterSnapshot, ModelView
from shared.bus import subjects
from shared.core.limits import MAX_GPU_INDEX, MAX_REPLICAS, bad_model_name, decimal
from shared.core.placement import lifecycle
from shared.core.placement.domain import GgufSpec, GpuSelector, ModelSpec, RestartPolicy, Worker, WorkerState
from shared.state import StateStore

if TYPE_CHECKING:  # the bus messages load numpy (columns): only commands that send one import them
    import redis.asyncio as aioredis
    from nats.aio.client import Client as NatsClient

    from ops.cli.connect import AnySettings
    from ops.cli.redis_reader import RedisReader
    from shared.bus.messages import CordonCommand, Message, RemoveWorkerCommand, ScaleCommand
    from shared.core.placement.planner import WorkerRemoval
    from shared.settings import Settings

# -- reading ----------------------------------------------------------------------------------------


def worker_state(worker: Worker, now: float, not_ready_after: float) -> WorkerState:
    """Spec §2, as every service judges it (``lifecycle.worker_state``)."""
    return lifecycle.worker_state(worker.cordoned, worker.last_heartbeat, now, not_ready_after)


async def read_snapshot(
    redis: aioredis.Redis | RedisReader, settings: AnySettings, model: str | None = None, now: float | None = None
) -> ClusterSnapshot:
    """Workers (with liveness at ``now``), instances and models, read from the state layer."""
    store = _store(redis)
    (workers, invalid), instances, specs, desired = await _all(
        redis, store.worker_records(), store.instances(model), store.models(), store.desired()
    )
    taken_at = time.time() if now is None else now
    states = {w.name: worker_state(w, taken_at, settings.not_ready_after_s) for w in workers}
    names = sorted(set(specs) | set(desired))
    models = tuple(ModelView(name, desired.get(name, 0), specs.get(name)) for name in names)
    return ClusterSnapshot(
        taken_at=taken_at,
        workers=tuple(workers),
        worker_states=states,
        instances=tuple(instances),
        models=models,
        invalid_workers=invalid,
    )


def _store(redis: aioredis.Redis | RedisReader) -> StateStore:
    # A RedisReader has the read calls of redis.asyncio.Redis that StateStore's reads make (ops.cli.redis_reader).
    return StateStore(cast("aioredis.Redis", redis))


async def _all(redis: aioredis.Redis | RedisReader, *reads: Awaitable[Any]) -> list[Any]:
    """The results of ``reads``: gathered on redis-py, so that a cancel (Ctrl-C in `gantry up`'s status loop) ends
    them at once, never reaching into redis-py, which can turn it into an error a caller would catch; one after
    the other on a RedisReader, which runs without an event loop (the read commands' fast path)."""
    if getattr(redis, "blocking", False):
        return [await read for read in reads]
    import asyncio

    return list(await asyncio.gather(*reads))


async def require_model(redis: aioredis.Redis | RedisReader, name: str) -> ModelSpec | None:
    """The model's spec; a CliError naming the known models if Gantry has never heard of it."""
    store = _store(redis)
    found = await _all(redis, store.model(name), store.desired())
    spec: ModelSpec | None = found[0]
    desired: dict[str, int] = found[1]
    if spec is None and name not in desired:
        known = ", ".join(sorted(desired)) or "none deployed yet"
        raise CliError(f"unknown model {quoted(name)} (known: {known}); deploy it with `gantry deploy FILE.yaml`")
    return spec


async def wait_for(
    redis: aioredis.Redis,
    settings: Settings,
    predicate: Callable[[ClusterSnapshot], bool],
    timeout: float,
    check: Callable[[], None] | None = None,
    interval: float = 0.25,
) -> ClusterSnapshot:
    """Poll the state until ``predicate`` holds; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        snapshot = await read_snapshot(redis, settings)
        if predicate(snapshot):
            return snapshot
        if time.monotonic() >= deadline:
            raise TimeoutError
        import asyncio

        await asyncio.sleep(interval)


# -- model files ------------------------------------------------------------------------------------

_NESTED: dict[str, type[msgspec.Struct]] = {"gpu_selector": GpuSelector, "gguf": GgufSpec, "restart": RestartPolicy}


def _unknown_fields(data: dict[str, object]) -> list[str]:
    """Keys the spec does not have (a typo such as ``replica:`` would otherwise be ignored)."""
    known = {f.name for f in msgspec.structs.fields(ModelSpec)}
    bad = [key for key in data if key not in known]
    for key, kind in _NESTED.items():
        nested = data.get(key)
        if isinstance(nested, dict):
            inner = {f.name for f in msgspec.structs.fields(kind)}
            bad += [f"{key}.{k}" for k in nested if k not in inner]
    return bad


def _plain_problem(data: dict[str, object]) -> str | None:
    name, replicas = data.get("name"), data.get("replicas")
    if isinstance(name, str) and (reason := bad_model_name(name, quoted)):
        return reason
    if isinstance(replicas, int) and replicas < 0:
        return f"negative replicas ({replicas})"
    if isinstance(replicas, int) and replicas > MAX_REPLICAS:
        return f"{replicas} replicas, more than the limit of {MAX_REPLICAS}"
    return None


_MARK = re.compile(r'^\s*in ".*", line (\d+), column (\d+)$')
_POSITION = re.compile(r'^\s*in ".*", position (\d+)$')  # the reader's mark (a character no YAML may hold)


def yaml_problem(path: Path, message: str) -> str:
    """A YAML parser message (several lines, marks as ``in "...", line L, column C``) as one line that leads
    with ``FILE:LINE:COLUMN`` (editors jump there) and names the problem at the last mark."""
    problem, where = "", None
    for line in message.splitlines():
        mark = _MARK.match(line)
        if mark:
            where = (int(mark.group(1)), int(mark.group(2)))
        elif _POSITION.match(line):
            continue  # not the problem: the line before it says what it is
        elif line.strip():
            problem = line.strip()
    if where is None:
        return f"{path}: not valid YAML ({problem or 'unreadable'})"
    row, col = where
    return f"{path}:{row}:{col}: not valid YAML: {problem} (line {row}, column {col})"


def load_spec(path: Path) -> ModelSpec:
    """Read and validate a model spec file; a CliError with exit code 2 says what is wrong."""
    from shared.bus.messages import ScaleCommand
    from shared.bus.validate import check_scale
    from shared.core import strict_yaml

    raw = read_input_file(path, "spec")
    try:
        data = strict_yaml.decode(raw)
    except msgspec.DecodeError as err:
        raise CliError(yaml_problem(path, str(err)), exit_code=2) from None
    except RecursionError:
        raise CliError(f"{path}: nested deeper than a model spec can be", exit_code=2) from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: a model spec must be a mapping of fields (name, source, ...)", exit_code=2)
    unknown = _unknown_fields(data)
    if unknown:
        raise CliError(f"{path}: unknown field(s) {', '.join(unknown)}", exit_code=2)
    problem = _plain_problem(data)  # the common mistakes in words, before the schema's own wording
    if problem:
        raise CliError(f"{path}: {problem}", exit_code=2)
    try:
        spec = msgspec.convert(data, ModelSpec)
    except msgspec.ValidationError as err:
        raise CliError(f"{path}: {err}", exit_code=2) from None
    # The same check the reconciler applies, so a bad spec is refused here, not dead-lettered later.
    problem = check_scale(ScaleCommand(model=spec.name, replicas=spec.replicas, spec=spec), known=None)
    if problem:
        raise CliError(f"{path}: {problem}", exit_code=2)
    problem = unsizable(spec)
    if problem:
        raise CliError(f"{path}: {problem}", exit_code=2)
    return spec


def unsizable(spec: ModelSpec) -> str | None:
    """Why placement could never size ``spec`` (it would stay PENDING forever), with the fix; None if it can."""
    from shared.catalog import resolve_arch
    from shared.core.placement.domain import Reason
    from shared.core.placement.pipeline import requirements

    arch = resolve_arch(spec)
    if spec.catalog_model and arch is None:
        return (f"catalog_model {quoted(spec.catalog_model)} is not in the model catalogue "
                "(`gantry catalog` lists the keys)")
    reason = requirements(spec, arch)
    return reason.message if isinstance(reason, Reason) else None


# -- publishing -------------------------------------------------------------------------------------


async def publish(nc: NatsClient, subject: str, message: Message, msg_id: str) -> int:
    """Publish a command on JetStream with a dedupe id; its stream sequence number."""
    import nats.errors
    import nats.js.errors

    from shared.bus.messages import encode

    js = nc.jetstream()
    try:
        ack = await js.publish(subject, encode(message), timeout=5, headers={"Nats-Msg-Id": msg_id})
    except nats.errors.NoRespondersError:
        raise CliError(
            "no stream accepts Gantry commands yet: the services create it when they start "
            "(is the stack running? `gantry up`)"
        ) from None
    except (nats.errors.TimeoutError, nats.js.errors.Error) as err:
        raise CliError(f"the command was not accepted: {err}") from None
    return int(ack.seq)


def scale_command(model: str, replicas: int, spec: ModelSpec | None = None) -> ScaleCommand:
    """A scale command with a fresh dedupe id."""
    from shared.bus.messages import ScaleCommand

    return ScaleCommand(model=model, replicas=replicas, spec=spec, request_id=f"cli-{uuid.uuid4().hex}")


async def send_scale(nc: NatsClient, command: ScaleCommand) -> int:
    """Publish a scale command (dedupe id = its request id)."""
    return await publish(nc, subjects.SCALE, command, command.request_id)


async def send_remove_worker(nc: NatsClient, command: RemoveWorkerCommand) -> int:
    """Publish a remove-worker command."""
    return await publish(nc, subjects.REMOVE_WORKER, command, f"cli-{uuid.uuid4().hex}")


def removal(snapshot: ClusterSnapshot, name: str, settings: Settings) -> WorkerRemoval | str:
    """What removing ``name`` would do, or why not: the reconciler's own rule, checked before sending."""
    from shared.core.placement.planner import Cluster, Timings, remove_worker

    cluster = Cluster(last_seen={w.name: w.last_heartbeat for w in snapshot.workers})
    timings = Timings(not_ready_after=settings.not_ready_after_s)
    invalid = name in snapshot.invalid_workers
    return remove_worker(name, snapshot.instances, cluster, snapshot.taken_at, timings, invalid_record=invalid)


def gone(snapshot: ClusterSnapshot, name: str) -> bool:
    """Whether ``name`` has left the state: no worker of that name, and no stored record of it (valid or not)."""
    return name not in snapshot.invalid_workers and all(w.name != name for w in snapshot.workers)


async def send_cordon(nc: NatsClient, command: CordonCommand) -> int:
    """Publish a cordon command."""
    return await publish(nc, subjects.CORDON, command, f"cli-{uuid.uuid4().hex}")


async def deploy_files(settings: Settings, files: Sequence[Path], confirm_timeout: float = 15.0) -> list[ModelSpec]:
    """Validate every file first, publish one scale command per model (with its spec), and return once
    the reconciler has recorded every spec, so a `gantry scale` right after a deploy finds the model."""
    from ops.cli.connect import connect_redis

    specs = [load_spec(path) for path in files]
    _one_file_per_model(specs, files)
    redis = await connect_redis(settings)
    try:
        nc = await connect_nats(settings)
        try:
            for spec in specs:
                await send_scale(nc, scale_command(spec.name, spec.replicas, spec))
        finally:
            await nc.close()
        await _confirm_recorded(StateStore(redis), specs, confirm_timeout)
    finally:
        await redis.aclose()
    return specs


def _one_file_per_model(specs: Sequence[ModelSpec], files: Sequence[Path]) -> None:
    """A CliError (exit 2) when two files name the same model: which one should win is the user's call."""
    first: dict[str, Path] = {}
    for spec, path in zip(specs, files, strict=True):
        if spec.name in first:
            raise CliError(f"model {spec.name} is in both {first[spec.name]} and {path}: deploy one", exit_code=2)
        first[spec.name] = path


async def _confirm_recorded(store: StateStore, specs: Sequence[ModelSpec], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = {spec.name: spec for spec in specs}
    while waiting:
        stored = await store.models()
        waiting = {name: spec for name, spec in waiting.items() if stored.get(name) != spec}
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise CliError(
                f"sent, but the reconciler has not recorded {', '.join(sorted(waiting))} within {timeout:g}s "
                "(is it running? `gantry events --dead-letters` shows rejected commands)"
            )
        import asyncio

        await asyncio.sleep(0.1)


def parse_target(target: str) -> tuple[str, int | None]:
    """``worker`` or ``worker:gpu-index`` -> (worker, index or None); exit 2 when malformed."""
    worker, sep, index = target.rpartition(":")
    if not sep:
        return worker_name(target), None
    if not worker or not decimal(index) or len(index) > 4 or int(index) > MAX_GPU_INDEX:
        raise CliError(
            f"expected WORKER or WORKER:GPU-INDEX (0..{MAX_GPU_INDEX}), got {quoted(target[:80])}", exit_code=2
        )
    return worker_name(worker), int(index)


async def require_worker(redis: aioredis.Redis, name: str, gpu_index: int | None) -> None:
    """A CliError when the worker (or that GPU of it) has never registered."""
    workers = {w.name: w for w in await StateStore(redis).workers()}
    worker = workers.get(name)
    if worker is None:
        raise CliError(unknown_worker(name, workers))
    indices = sorted(g.index for g in worker.gpus)
    if gpu_index is not None and gpu_index not in indices:
        raise CliError(f"worker {quoted(name)} has no GPU {gpu_index} (it has {len(indices)}: {_indices(indices)})")


def unknown_worker(name: str, known: Iterable[str]) -> str:
    """The error for a worker not in the state, naming (the first few of) those that are: every command that
    names a worker says it alike (cordon, uncordon, workers remove)."""
    names = sorted(known)
    shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    return f"unknown worker {quoted(name)} (known: {shown or 'none registered'})"


def _indices(indices: Sequence[int]) -> str:
    """GPU indices as a range when they are one (``0..7``), else listed (``0, 2, 5``; the first 16)."""
    if indices and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ", ".join(map(str, indices[:16])) + (" ..." if len(indices) > 16 else "")


async def with_both(
    settings: Settings, fn: Callable[[NatsClient, aioredis.Redis], Awaitable[object]]
) -> object:
    """Run ``fn`` with a NATS and a Redis connection, closing both afterwards."""
    from ops.cli.connect import connect_redis

    redis = await connect_redis(settings)
    try:
        nc = await connect_nats(settings)
        try:
            return await fn(nc, redis)
        finally:
            await nc.close()
    finally:
        await redis.aclose()


def desired_of(snapshot: ClusterSnapshot, model: str) -> int:
    """Desired replicas of ``model`` in a snapshot (0 when unknown)."""
    return lifecycle.desired_of({m.name: m.desired for m in snapshot.models}, model)


def running_of(snapshot: ClusterSnapshot, models: Sequence[str]) -> dict[str, int]:
    """RUNNING instance count per model."""
    counts = dict.fromkeys(models, 0)
    for inst in snapshot.instances:
        if inst.model in counts and inst.state.value == "RUNNING":
            counts[inst.model] += 1
    return counts
