"""Every payload that crosses a service boundary, as a msgspec struct with a schema version.

Rules: fields are added with defaults, never renamed or retyped; ``v`` is the schema version of the
message and a consumer rejects (dead-letters) a version newer than it knows. Domain types come from
:mod:`shared.core.placement.domain` so the pipeline carries exactly what the core consumes.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

import msgspec

from shared.bus.columns import CandidateSet
from shared.core.kv_events import MAX_BATCH_BLOCKS, KVEventBatch
from shared.core.limits import (
    MAX_BATCH_ITEMS,
    MAX_GPUS_PER_WORKER,
    MAX_ID_LENGTH,
    MAX_INSTANCES_PER_WORKER,
    MAX_LIST,
    MAX_MESSAGE_BYTES,
    MAX_TIME,
    Attempt,
    BlockSize,
    Count,
    EngineRequests,
    Fraction,
    GpuIndex,
    InstanceId,
    KvBlocks,
    ModelName,
    RamBytes,
    Replicas,
    Seq,
    Text,
    Time,
    WorkerName,
)
from shared.core.placement.domain import (
    Decision,
    FilterReport,
    FilterResult,
    FitResult,
    GpuIndexes,
    GpuUsage,
    Instance,
    InstanceState,
    ModelFileState,
    ModelSpec,
    Reason,
    Unschedulable,
    VramClaims,
    Worker,
)

# 2: filtered and fitted messages carry each report list, GPU mask and claims column once (report_sets,
# byte_sets); a v1 consumer would read them as empty, so it must refuse them instead.
SCHEMA_VERSION = 2
H = TypeVar("H", tuple[str, ...], tuple[FilterReport, ...], bytes)
# Positions in a message's tables. A negative position would silently pick a row from the end (Python
# indexing), so only the documented -1 ("inline") is accepted where inline values exist.
Row = Annotated[int, msgspec.Meta(ge=0)]
RowOrInline = Annotated[int, msgspec.Meta(ge=-1)]


class Message(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=False):
    """Base of every bus message: carries the schema version.

    Messages are immutable values without reference cycles: ``gc=False`` keeps them out of the cycle
    collector (as the core's domain structs).
    """

    v: int = SCHEMA_VERSION


# -- operator commands ----------------------------------------------------------------------------


class ScaleCommand(Message, frozen=True, kw_only=True):
    """Desired replicas of a model. ``spec`` is required the first time a model is named."""

    model: ModelName
    replicas: Replicas
    spec: ModelSpec | None = None
    request_id: Text = ""  # dedupe id chosen by the sender (Nats-Msg-Id)


class RemoveWorkerCommand(Message, frozen=True, kw_only=True):
    """Forget a worker that is no longer heard from, with every replica placed on it (replaced elsewhere)."""

    worker: WorkerName


class CordonCommand(Message, frozen=True, kw_only=True):
    """Cordon (or uncordon) a whole worker, or one GPU of it when ``gpu_index`` is set."""

    worker: WorkerName
    cordoned: bool = True
    gpu_index: GpuIndex | None = None


# -- worker reports ---------------------------------------------------------------------------------


class WorkerRegistration(Message, frozen=True, kw_only=True):
    """A worker's full inventory. ``worker.last_heartbeat`` is ignored: receivers stamp their own."""

    worker: Worker


class SyncRequest(Message, frozen=True, kw_only=True):
    """Ask workers to send their WorkerRegistration now (``worker`` None: every worker). ``by`` (who asks) is
    required: JSON the server itself publishes on a subject a client chose (a JetStream publish acknowledgement sent
    to a forged reply subject, a consumer's delivery) then never reads as an ask."""

    by: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    worker: WorkerName | None = None


class Heartbeat(Message, frozen=True, kw_only=True):
    """Light liveness report: usage per GPU index and the instances the worker holds."""

    worker: WorkerName
    seq: Seq = 0
    ram_used: RamBytes = 0
    gpus: Annotated[tuple[GpuUsage, ...], msgspec.Meta(max_length=MAX_GPUS_PER_WORKER)] = ()
    instances: Annotated[tuple[InstanceId, ...], msgspec.Meta(max_length=MAX_INSTANCES_PER_WORKER)] = ()


class ModelFileUpdate(Message, frozen=True, kw_only=True):
    """Readiness of one model source's files on one worker."""

    worker: WorkerName
    source: Text
    state: ModelFileState
    progress: Fraction = 0.0


WORKER_REPORTED = frozenset({InstanceState.SCHEDULED, InstanceState.STARTING, InstanceState.RUNNING,
                             InstanceState.ERROR})
"""The states a worker's own report may move one of its replicas to (idle and deleted reports carry any)."""


class InstanceStatus(Message, frozen=True, kw_only=True):
    """A worker's report on one of its instances. ``deleted`` confirms removal."""

    instance_id: InstanceId
    worker: WorkerName
    state: InstanceState
    idle: bool = False  # while DRAINING: no request in flight any more
    deleted: bool = False
    message: Text | None = None

    def __post_init__(self) -> None:
        # PENDING, DRAINING and UNREACHABLE are the reconciler's to set: a worker moving its own replica there
        # (an ERROR one back to PENDING kept its GPU claims and was never replaced) is refused at decode.
        if not (self.idle or self.deleted) and self.state not in WORKER_REPORTED:
            raise ValueError(f"a worker cannot report state {self.state.value}")


class InstanceReports(Message, frozen=True, kw_only=True):
    """Several of one worker's reports made at the same moment (instances assigned together start together):
    one durable message and one acknowledgement instead of one per instance. A lone ``InstanceStatus`` on the
    status subject is still read as a report of one."""

    reports: Annotated[tuple[InstanceStatus, ...], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


# -- placement pipeline -----------------------------------------------------------------------------


class PlacementItem(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One replica to place. ``attempt`` grows on every refused commit or retry."""

    instance_id: InstanceId
    model: ModelName
    attempt: Attempt = 0
    requested_at: Time = 0.0  # wall-clock time the scale event that caused it arrived


class PlacementRequest(Message, frozen=True, kw_only=True):
    """A batch of replicas to place, with the specs of their models (requested)."""

    batch_id: Text
    items: Annotated[tuple[PlacementItem, ...], msgspec.Meta(max_length=MAX_BATCH_ITEMS)]
    specs: Annotated[dict[ModelName, ModelSpec], msgspec.Meta(max_length=MAX_BATCH_ITEMS)]


class FilteredModel(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One model's filter outcome inside a PlacementFiltered: its survivor set and its reports (by position
    in the message's tables; ``reports`` inline when ``report_set`` is -1)."""

    survivors: Row  # index into PlacementFiltered.survivor_sets
    reports: tuple[FilterReport, ...] = ()
    report_set: RowOrInline = -1  # index into PlacementFiltered.report_sets


class PlacementFiltered(Message, frozen=True, kw_only=True):
    """Filter output: the core's FilterResult per model of the request (models with survivors only).

    Survivor lists are cluster-sized and usually identical across the models of a request, so each
    distinct list travels once in ``survivor_sets`` and models point at it; so do the filters' reports
    (one per filter and model: most of the message when they travelled with each model).
    """

    request: PlacementRequest
    survivor_sets: tuple[tuple[str, ...], ...]
    filtered: dict[str, FilteredModel]
    report_sets: tuple[tuple[FilterReport, ...], ...] = ()

    @classmethod
    def of(cls, request: PlacementRequest, results: dict[str, FilterResult]) -> PlacementFiltered:
        """Pack FilterResults, each distinct survivor list and report list once."""
        survivors = _Table[tuple[str, ...]]()
        reports = _Table[tuple[FilterReport, ...]]()
        filtered = {
            model: FilteredModel(survivors=survivors.index(res.survivors), report_set=reports.index(res.reports))
            for model, res in results.items()
        }
        return cls(request=request, survivor_sets=survivors.rows(), filtered=filtered, report_sets=reports.rows())

    def __post_init__(self) -> None:
        # A position past its table is refused at decode (dead-lettered alone), not found later by the handler.
        for m in self.filtered.values():
            _in_table(m.survivors, self.survivor_sets, "survivors")
            _in_table(m.report_set, self.report_sets, "report_set")

    def result(self, model: str) -> FilterResult | None:
        """The core's FilterResult of one model, or None if the model was not filtered here."""
        got = self.filtered.get(model)
        if got is None:
            return None
        reports = got.reports if got.report_set < 0 else self.report_sets[got.report_set]
        return FilterResult(model=model, survivors=self.survivor_sets[got.survivors], reports=reports)


def _in_table(position: int, table: tuple[object, ...], field: str) -> None:
    """Raise ValueError when ``position`` is past the end of ``table`` (-1, inline, is always in range)."""
    if position >= len(table):
        raise ValueError(f"{field} {position} is past the end of its table ({len(table)} rows)")


class _Table(Generic[H]):
    """The distinct values of a message's table, each numbered once. A value object shared by several models
    is hashed once (a cluster-sized tuple hashes every name; a mask, every byte): the table is keyed by
    identity first, and holds each value it has seen so that no identity is reused while it is in use."""

    def __init__(self) -> None:
        self._by_value: dict[H, int] = {}
        self._by_id: dict[int, tuple[H, int]] = {}

    def index(self, value: H) -> int:
        """``value``'s row, a new one if no equal value has one yet."""
        seen = self._by_id.get(id(value))
        if seen is not None:
            return seen[1]
        k = self._by_value.setdefault(value, len(self._by_value))
        self._by_id[id(value)] = (value, k)
        return k

    def rows(self) -> tuple[H, ...]:
        """The distinct values, by row."""
        return tuple(self._by_value)


class FittedColumns(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One model's CandidateSet on the wire; its worker list is ``PlacementFitted.worker_sets[workers]``, its
    GPU masks and claims ``PlacementFitted.byte_sets[gpus_set]`` and ``[claims_set]`` (inline when -1)."""

    strategy: str
    workers: Row
    gpus: bytes = b""
    claim: int = 0
    claims: bytes = b""
    ram_claim: int = 0
    cpu_claim: int = 0  # milli-cores
    gpus_set: RowOrInline = -1
    claims_set: RowOrInline = -1


class PlacementFitted(Message, frozen=True, kw_only=True):
    """Fitting output for some models of a request (models with candidates only; large requests are split).

    Single-GPU candidates travel as ``columns`` (the core's compact CandidateSet; the model's FitResult
    then has no candidates, only strategy and reasons); any other shape as FitResult candidates. Worker
    lists are cluster-sized and mostly shared by the models of a message, so each distinct list travels
    once in ``worker_sets`` (and decodes into one tuple the models share); so does each distinct GPU mask
    and claims column, in ``byte_sets`` (models of one shape have equal ones).
    """

    request: PlacementRequest
    fitted: dict[str, FitResult]
    worker_sets: tuple[tuple[str, ...], ...] = ()
    columns: dict[str, FittedColumns] = {}
    byte_sets: tuple[bytes, ...] = ()

    @classmethod
    def of(
        cls, request: PlacementRequest, fitted: dict[str, FitResult], columns: dict[str, CandidateSet]
    ) -> PlacementFitted:
        """Pack the candidates, each distinct worker list, mask and claims column once."""
        workers = _Table[tuple[str, ...]]()
        blobs = _Table[bytes]()
        packed = {
            model: FittedColumns(
                strategy=c.strategy, workers=workers.index(c.workers), gpus_set=blobs.index(c.gpus), claim=c.claim,
                claims_set=blobs.index(c.claims) if c.claims else -1, ram_claim=c.ram_claim, cpu_claim=c.cpu_claim,
            )
            for model, c in columns.items()
        }
        return cls(request=request, fitted=fitted, worker_sets=workers.rows(), columns=packed, byte_sets=blobs.rows())

    def __post_init__(self) -> None:
        # As in PlacementFiltered: every position within its table, checked at decode.
        for c in self.columns.values():
            _in_table(c.workers, self.worker_sets, "workers")
            _in_table(c.gpus_set, self.byte_sets, "gpus_set")
            _in_table(c.claims_set, self.byte_sets, "claims_set")

    def candidate_set(self, model: str) -> CandidateSet | None:
        """The core's CandidateSet of one model, or None if its candidates are not columns."""
        c = self.columns.get(model)
        if c is None:
            return None
        return CandidateSet(
            model=model, strategy=c.strategy, workers=self.worker_sets[c.workers],
            gpus=c.gpus if c.gpus_set < 0 else self.byte_sets[c.gpus_set], claim=c.claim,
            claims=c.claims if c.claims_set < 0 else self.byte_sets[c.claims_set], ram_claim=c.ram_claim,
            cpu_claim=c.cpu_claim,
        )


class ItemOutcome(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Scoring's verdict for one item: a decision, or why it cannot be placed now."""

    item: PlacementItem
    decision: Decision | None = None
    unschedulable: Unschedulable | None = None
    retry: bool = False  # not a verdict on the cluster: the candidates went stale in flight; place again


class PlacementScored(Message, frozen=True, kw_only=True):
    """Scoring output: one outcome per item, to be committed by the reconciler."""

    batch_id: Text
    outcomes: Annotated[tuple[ItemOutcome, ...], msgspec.Meta(max_length=MAX_BATCH_ITEMS)]
    specs: Annotated[dict[ModelName, ModelSpec], msgspec.Meta(max_length=MAX_BATCH_ITEMS)] = {}


# -- commands to workers ----------------------------------------------------------------------------


class AssignInstance(Message, frozen=True, kw_only=True):
    """Start an instance the reconciler committed to this worker."""

    instance_id: InstanceId
    model: ModelName
    source: Text = ""
    gpu_indexes: GpuIndexes = ()
    vram_claims: VramClaims = ()


class AssignInstances(Message, frozen=True, kw_only=True):
    """Several instances committed to one worker at once (one message instead of one per instance); a lone
    ``AssignInstance`` on the assign subject is still read as an assignment of one."""

    instances: Annotated[tuple[AssignInstance, ...], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


class DrainInstance(Message, frozen=True, kw_only=True):
    """Stop routing new requests to an instance; report ``idle`` when nothing is in flight."""

    instance_id: InstanceId


class DeleteInstance(Message, frozen=True, kw_only=True):
    """Stop and remove an instance."""

    instance_id: InstanceId


# -- events -----------------------------------------------------------------------------------------


class DecisionEvent(Message, frozen=True, kw_only=True):
    """A replica was committed: where, with what score breakdown, after how many attempts."""

    instance_id: str
    model: str
    worker: str
    gpu_indexes: tuple[int, ...]
    score: float
    breakdown: dict[str, float]
    attempt: int
    latency_ms: float  # scale event in → committed
    at: float


class UnschedulableEvent(Message, frozen=True, kw_only=True):
    """A replica stays PENDING: the core's message and per-plugin reasons."""

    instance_id: str
    model: str
    message: str
    reasons: tuple[Reason, ...] = ()
    filters: tuple[FilterReport, ...] = ()
    at: float


class InstanceEvent(Message, frozen=True, kw_only=True):
    """An instance changed: its full current record, or ``removed``."""

    instance: Instance
    removed: bool = False
    at: Time = 0.0


class DecisionEvents(Message, frozen=True, kw_only=True):
    """Replicas committed together (one message per batch of scored outcomes the reconciler committed)."""

    events: tuple[DecisionEvent, ...]


class InstanceEvents(Message, frozen=True, kw_only=True):
    """Instance changes in the order they happened: one message per batch the reconciler handled.

    Every placement moves an instance through several states, and every service follows them; one
    message per batch instead of per change keeps that fan-out from dominating the bus under load.
    """

    events: Annotated[tuple[InstanceEvent, ...], msgspec.Meta(max_length=MAX_BATCH_ITEMS)]


class CordonEvent(Message, frozen=True, kw_only=True):
    """Cordon state changed for a worker or one GPU."""

    worker: WorkerName
    cordoned: bool
    gpu_index: GpuIndex | None = None


class WorkerRemovedEvent(Message, frozen=True, kw_only=True):
    """A worker left the state; every snapshot drops it."""

    worker: WorkerName
    reason: Text = ""


class WorkerRegisteredEvent(Message, frozen=True, kw_only=True):
    """A worker's inventory as the state writer stored it, with the store's revision of it.

    Revisions grow with every store of any worker (``StateStore.register_workers``): a snapshot applies an event
    only if it is newer than what it holds of that worker, so duplicates, redeliveries and events from several
    writer replicas arriving out of order leave it at the latest stored inventory.
    """

    worker: Worker
    revision: Seq


class ModelEvent(Message, frozen=True, kw_only=True):
    """A model's desired replicas or spec changed."""

    model: ModelName
    replicas: Replicas
    spec: ModelSpec | None = None


class ModelEvents(Message, frozen=True, kw_only=True):
    """Models whose desired replicas (or spec) changed, one message per command batch."""

    events: tuple[ModelEvent, ...]


class ErrorEvent(Message, frozen=True, kw_only=True):
    """A message a service rejected (dead letter): which, where it came from, and why."""

    service: str
    subject: str
    reason: str
    payload: str = ""  # the first bytes of the rejected payload, for humans
    at: float = 0.0


# -- model servers (core NATS; emulated engines and real ones publish the same shape) ----------------


class EngineMetrics(Message, frozen=True, kw_only=True):
    """A model server's load, pushed every 50-100 ms (routing spec §1, model-server protocol).

    Figures follow vLLM's metric names: running/waiting requests, ``kv_cache_usage_perc`` in [0, 1],
    the KV block size and count; counters are cumulative since the server started. Every figure is
    bounded (``shared.core.limits``): the pickers route on them and size the server's prefix index from
    ``num_gpu_blocks``, so a negative queue, a usage of 7 or a far-off time is dead-lettered, not believed.
    """

    instance_id: InstanceId
    model: Text
    url: Text  # base URL of the OpenAI-compatible API
    ts: Time  # unix seconds when sampled
    num_requests_running: EngineRequests
    num_requests_waiting: EngineRequests
    kv_cache_usage_perc: Fraction
    block_size: BlockSize
    num_gpu_blocks: KvBlocks
    running_loras: Annotated[list[Text], msgspec.Meta(max_length=MAX_LIST)] = []
    waiting_loras: Annotated[list[Text], msgspec.Meta(max_length=MAX_LIST)] = []
    prefix_cache_queries: Count = 0
    prefix_cache_hits: Count = 0
    num_preemptions: Count = 0
    prompt_tokens: Count = 0
    generation_tokens: Count = 0
    max_loras: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIST)] = 0  # LoRA slots per batch (vLLM: max_loras); 0 = off
    role: Text = "mixed"  # P/D role: prefill | decode | mixed (shared.core.roles.NodeRole)
    num_requests_waiting_for_remote_kv: EngineRequests = 0  # decode side: admitted, waiting for the prefill's KV
    clock_lag_s: Time = 0.0  # how far the emulated engine trails its clock (0 when it keeps time)
    # what the server's NATS publisher dropped since it started (its /metrics has them too): KV-event batches (the
    # backlog was full: consumers saw a gap) and prefix-cache snapshot requests (their requester timed out). 0 from
    # a server older than these fields; a reader older than them ignores them.
    kv_events_dropped: Count = 0
    kv_snapshot_requests_dropped: Count = 0


class EngineKVEvents(Message, frozen=True, kw_only=True):
    """A model server's KV-cache events since its previous message (vLLM's ``KVEventBatch``: blocks stored
    with their chained hashes and parent, blocks removed, all cleared).

    ``seq`` counts this instance's messages from 0 (restarting with the server): a consumer that sees a gap
    lost events and should drop what it knows of this instance's cache (it is rebuilt as blocks are stored).
    """

    instance_id: InstanceId
    model: Text
    seq: Seq
    batch: KVEventBatch

    def __post_init__(self) -> None:
        # applied at once by every follower: bounded in all, not only per list (``kv_events.split_batch``)
        if (blocks := self.batch.blocks()) > MAX_BATCH_BLOCKS:
            raise ValueError(f"{blocks} block hashes in one message (at most {MAX_BATCH_BLOCKS})")


MAX_SNAPSHOT_BLOCKS = 20_000
"""Block hashes in one prefix-cache snapshot: ~0.4 MB of JSON, far below the message bound; a pool holding more
answers its most recently cached blocks (a subset of a cache is sound for routing: a prefix matches shorter)."""
Nonce = Annotated[str, msgspec.Meta(min_length=16, max_length=64)]


class KVSnapshotRequest(Message, frozen=True, kw_only=True):
    """A picker asks one model server for its prefix-cache snapshot; ``nonce`` (fresh random text per request)
    comes back inside the signed answer, so a recorded answer cannot be replayed to a later request."""

    nonce: Nonce


class EngineKVSnapshot(Message, frozen=True, kw_only=True):
    """The block hashes a model server's prefix cache holds (at most ``MAX_SNAPSHOT_BLOCKS``, the most recently
    cached; ``total`` counts them all) as of its KV-event message ``next_seq``: every event numbered below it is
    already in the snapshot, every one from it on is not."""

    instance_id: InstanceId
    model: Text
    nonce: Nonce
    next_seq: Seq
    block_hashes: Annotated[list[int], msgspec.Meta(max_length=MAX_SNAPSHOT_BLOCKS)]
    total: Count = 0



# -- the picker's request/reply protocol (core NATS; seed 002's "replacement scheduler" interface) -----

MAX_PROMPT_TOKENS = 1 << 20  # token ids in one pick request (the message size bound applies too)
TokenIds = Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]], msgspec.Meta(max_length=MAX_PROMPT_TOKENS)]
RequestIds = Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]],
                       msgspec.Meta(max_length=MAX_BATCH_ITEMS)]


class PickItem(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=False):
    """One request to place: its id (unique among the caller's requests in flight), the base model, the prompt
    as token ids (the engines' tokenizer; matched against their KV events) or as text (approximate prefix
    only), and the routing core's request attributes (priority < 0 is sheddable)."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    model: ModelName
    token_ids: TokenIds | None = None
    prompt: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_BYTES)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    tenant: Text = ""
    lora: Text | None = None
    slo_ttft_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_TIME)] | None = None
    cache_salt: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)] = 0


class EndpointOutcome(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=False):
    """One engine's news at one gateway replica: a request failed there (``failed``), or one succeeded there after
    failures (not ``failed``)."""

    endpoint: InstanceId
    failed: bool


class FailingEndpoint(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=False):
    """An engine one gateway replica counts as failing: ``streak`` failures in a row, the last ``age_s`` ago."""

    endpoint: InstanceId
    streak: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    age_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TIME)]


class EndpointOutcomes(Message, frozen=True, kw_only=True):
    """What one gateway replica (``replica``, random per process start) saw of its engines since its last message
    (``outcomes``, oldest first), and, now and then, which engines it counts as failing now (``failing``: a replica
    that started later learns of an engine the others already leave out). ``seq`` counts from 0 per replica (a
    duplicate is dropped); ``sent_at`` (the sender's clock) lets a receiver drop news delivered late (NATS buffers
    what a disconnected client publishes and sends it on reconnect)."""

    replica: Annotated[str, msgspec.Meta(min_length=8, max_length=64)]
    seq: Seq
    sent_at: Time
    outcomes: Annotated[list[EndpointOutcome], msgspec.Meta(max_length=MAX_BATCH_ITEMS)] = []
    failing: Annotated[list[FailingEndpoint], msgspec.Meta(max_length=MAX_BATCH_ITEMS)] = []


class PickRequest(Message, frozen=True, kw_only=True):
    """One or more requests to place (request/reply: the reply is a ``PickReply``, answers in the same order)."""

    picks: Annotated[list[PickItem], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


class PickAnswer(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=False):
    """Where one request goes: ``endpoints`` (instance ids) and their ``addresses`` (host:port), first choice
    then fallbacks; or no endpoint, with ``code`` (503 none can serve, 429 shed, 400 this item could not be read:
its ``request_id`` is then empty) and ``reason``."""

    request_id: str
    endpoints: list[str] = []
    addresses: list[str] = []
    prefill: str | None = None  # P/D: the endpoint that prefills, when disaggregated
    code: int = 200
    reason: str = ""


class PickReply(Message, frozen=True, kw_only=True):
    """The answers to a ``PickRequest``, in its order; ``error`` alone when the request was rejected as a whole."""

    answers: list[PickAnswer] = []
    error: str = ""


class PickProgress(Message, frozen=True, kw_only=True):
    """Requests whose first token arrived and requests that ended, for the pickers' in-flight accounting; every
    picker replica reads it and ignores ids it did not place (idempotent). ``finished``: ended with an answer from
    their engine, or with no outcome known; ``failed``: ended because their engine failed them (an error answer,
    or none), which keeps that engine from counting as idle for 10 s or until it serves again."""

    first_token: RequestIds = []
    finished: RequestIds = []
    failed: RequestIds = []

T = TypeVar("T", bound=msgspec.Struct)

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def encode(msg: msgspec.Struct) -> bytes:
    """JSON bytes of a message."""
    return _encoder.encode(msg)


class MessageError(ValueError):
    """A payload could not be decoded into the expected message (the reason is human-readable)."""


def decode(data: bytes, kind: type[T]) -> T:
    """Decode ``data`` as ``kind`` or raise MessageError with a one-line reason (whatever the decoder raised)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"invalid {kind.__name__}: {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        msg: T = dec.decode(data)
    except msgspec.DecodeError as exc:
        raise MessageError(f"invalid {kind.__name__}: {exc}") from None
    except RecursionError:  # unknown fields are skipped recursively: a hostile payload nests them deep
        raise MessageError(f"invalid {kind.__name__}: RecursionError: nested deeper than the decoder allows") from None
    except Exception as exc:  # whatever else bytes can make the decoder raise
        raise MessageError(f"invalid {kind.__name__}: {type(exc).__name__}: {exc}") from None
    version = getattr(msg, "v", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise MessageError(f"{kind.__name__} schema v{version} is newer than supported v{SCHEMA_VERSION}")
    return msg
