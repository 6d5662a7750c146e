"""Placement domain: workers and GPUs, model specs, instances, candidates, decisions and reasons.

Sizes are integers in bytes and times are seconds on the caller's clock (the core never reads one).
These structs cross service boundaries as msgspec JSON, so fields are added with defaults, never
renamed. They are immutable values that never form reference cycles, so they are kept out of Python's
cycle collector (``gc=False``): services decode thousands a second, and every tracked object lengthens
the collector's pauses.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Protocol

import msgspec

from shared.core.limits import (
    MAX_GPUS_PER_REPLICA,
    MAX_GPUS_PER_WORKER,
    MAX_LIST,
    GpuCount,
    GpuIndex,
    InstanceId,
    Labels,
    Layers,
    MilliCores,
    ModelBytes,
    ModelName,
    RamBytes,
    Replicas,
    Text,
    Time,
    Tokens,
    VramBytes,
    WorkerName,
)

GIB = 1 << 30
# Lists of a placement, bounded like the GPUs they name.
GpuIndexes = Annotated[tuple[GpuIndex, ...], msgspec.Meta(max_length=MAX_GPUS_PER_REPLICA)]
VramClaims = Annotated[tuple[VramBytes, ...], msgspec.Meta(max_length=MAX_GPUS_PER_REPLICA)]


class WorkerState(StrEnum):
    """Liveness of a worker, judged from its heartbeat age at read time."""

    READY = "READY"
    NOT_READY = "NOT_READY"
    MAINTENANCE = "MAINTENANCE"


class InstanceState(StrEnum):
    """Lifecycle of one model replica."""

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    ERROR = "ERROR"
    UNREACHABLE = "UNREACHABLE"


class Backend(StrEnum):
    """Inference server that runs a model."""

    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMA_CPP = "llama-cpp"
    CUSTOM = "custom"


class Category(StrEnum):
    """What a model does; decides how its memory is claimed."""

    LLM = "llm"
    EMBEDDING = "embedding"
    RERANKER = "reranker"
    SPEECH_TO_TEXT = "speech-to-text"
    TEXT_TO_SPEECH = "text-to-speech"
    IMAGE = "image"


class PlacementStrategy(StrEnum):
    """Scale-up placement policy of a model.

    ``spread`` and ``binpack`` are GPUStack's, decision for decision; ``auto`` (the default) is Gantry's:
    the placement that strands the least GPU capacity, judged on GPUs, CPU and RAM together.
    """

    AUTO = "auto"
    SPREAD = "spread"
    BINPACK = "binpack"


class ModelFileState(StrEnum):
    """Readiness of a model's files on one worker."""

    DOWNLOADING = "DOWNLOADING"
    READY = "READY"
    ERROR = "ERROR"


class Gpu(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One accelerator as its worker reports it."""

    index: GpuIndex
    vendor: Text = "cuda"  # cuda | rocm | metal | cpu ...
    product: Text = ""  # e.g. H100-SXM-80GB
    vram_total: VramBytes
    vram_used: VramBytes = 0  # reported by the worker: every process, Gantry-managed or not
    runtime_version: Text = ""
    labels: Labels = {}
    schedulable: bool = True  # False cordons this GPU alone


class Worker(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A machine that runs model instances, as of its latest heartbeat."""

    name: WorkerName
    cluster: Text = "default"
    labels: Labels = {}
    gpus: Annotated[tuple[Gpu, ...], msgspec.Meta(max_length=MAX_GPUS_PER_WORKER)] = ()
    ram_total: RamBytes = 0
    ram_used: RamBytes = 0
    # CPU in milli-cores (1000 = one core); 0 = not reported, and CPU is then not checked on this worker
    cpu_total: MilliCores = 0
    cpu_used: MilliCores = 0
    last_heartbeat: Time = 0.0
    cordoned: bool = False
    local_paths: Annotated[tuple[Text, ...], msgspec.Meta(max_length=MAX_LIST)] = ()


class GpuUsage(msgspec.Struct, frozen=True, kw_only=True, gc=False, array_like=True):
    """VRAM in use on one GPU (every process, Gantry-managed or not)."""

    index: GpuIndex
    vram_used: VramBytes


class WorkerUsage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A worker's latest reported usage: RAM and VRAM per GPU index (what a heartbeat carries and the state
    layer keeps; fields a heartbeat adds beyond these are ignored when read back)."""

    worker: WorkerName
    ram_used: RamBytes = 0
    gpus: Annotated[tuple[GpuUsage, ...], msgspec.Meta(max_length=MAX_GPUS_PER_WORKER)] = ()


class UsageReport(Protocol):
    """Anything that reports a worker's usage (a WorkerUsage, or a heartbeat message on the bus)."""

    @property
    def worker(self) -> str:
        """The reporting worker's name."""
        ...

    @property
    def ram_used(self) -> int:
        """Host RAM in use."""
        ...

    @property
    def gpus(self) -> tuple[GpuUsage, ...]:
        """VRAM in use per GPU index."""
        ...


class GpuSelector(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """How a model asks for GPUs: explicit ids, a count, and/or a GPU type."""

    gpu_ids: Annotated[tuple[Text, ...], msgspec.Meta(max_length=MAX_LIST)] = ()  # "worker:index"
    gpus_per_replica: GpuCount | None = None
    gpu_type: Text | None = None  # product name, e.g. "H100-SXM-80GB"
    labels: Labels = {}  # every label must equal the GPU's own label


class GgufSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Per-layer sizes of a GGUF model (from the file header, or given)."""

    total_layers: Layers
    layer_bytes: ModelBytes
    non_layer_bytes: ModelBytes
    kv_bytes_per_token_per_layer: ModelBytes
    context_size: Tokens = 8192


# A policy delay: finite, not negative, at most a week (NaN fails both bounds).
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=7 * 24 * 3600.0)]


class RestartMode(StrEnum):
    """Whether failed (ERROR) replicas of a model are replaced."""

    ALWAYS = "always"
    NEVER = "never"


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """How a model's failed replicas are replaced (kube's restartPolicy + CrashLoopBackOff, Nomad's reschedule).

    An ERROR replica is replaced ``grace_s`` after it failed; each further replacement of the model waits
    ``backoff_s × 2^(n-1)`` more, up to ``max_backoff_s``; the count starts again after ``reset_after_s``
    without a replacement.
    """

    mode: RestartMode = RestartMode.ALWAYS
    grace_s: Seconds = 30.0
    backoff_s: Seconds = 10.0
    max_backoff_s: Seconds = 300.0
    reset_after_s: Seconds = 600.0


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A deployment: what to run, how many replicas, and where it may go."""

    name: ModelName
    source: Text = ""  # hub repo id or local path; a ".gguf" file marks a GGUF model
    backend: Backend = Backend.VLLM
    backend_version: Text = ""
    backend_parameters: Annotated[tuple[Text, ...], msgspec.Meta(max_length=MAX_LIST)] = ()  # e.g. ("--tp=2",)
    categories: Annotated[tuple[Category, ...], msgspec.Meta(max_length=16)] = (Category.LLM,)
    replicas: Replicas = 1
    placement_strategy: PlacementStrategy = PlacementStrategy.AUTO
    cluster: Text = "default"
    worker_selector: Labels = {}
    gpu_selector: GpuSelector | None = None
    distributed_inference_across_workers: bool = False
    cpu_offloading: bool = False
    vram_claim: ModelBytes | None = None  # explicit per-replica VRAM; wins over estimates
    ram_claim: RamBytes | None = None
    cpu_claim: MilliCores | None = None  # milli-cores each worker of a replica needs
    weight_bytes: ModelBytes | None = None  # W, when not derivable from a known config
    catalog_model: Text | None = None  # key in the model-config catalogue, when the name is not one
    dtype: Text = "bfloat16"
    gguf: GgufSpec | None = None
    restart: RestartPolicy = RestartPolicy()  # what happens to failed (ERROR) replicas


class SubordinateWorker(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Another worker's share of a multi-worker instance."""

    worker: WorkerName
    gpu_indexes: GpuIndexes
    vram_claims: VramClaims  # parallel to gpu_indexes
    ram_claim: RamBytes = 0
    cpu_claim: MilliCores = 0  # milli-cores


class Candidate(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One feasible placement of a replica, as produced by a fit strategy."""

    worker: WorkerName
    gpu_indexes: GpuIndexes
    vram_claims: VramClaims  # parallel to gpu_indexes
    ram_claim: RamBytes = 0
    subordinates: Annotated[tuple[SubordinateWorker, ...], msgspec.Meta(max_length=MAX_GPUS_PER_REPLICA)] = ()
    strategy: str = ""  # the fit strategy that produced it
    total_layers: Layers | None = None
    offload_layers: Layers | None = None
    overcommit: str | None = None  # why this manual placement overcommits, if it does
    cpu_claim: MilliCores = 0  # milli-cores on the main worker (subordinates carry their own)


class Instance(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One replica of a model and what it holds."""

    id: InstanceId
    model: ModelName
    state: InstanceState = InstanceState.PENDING
    worker: WorkerName | None = None
    gpu_indexes: GpuIndexes = ()
    vram_claims: VramClaims = ()
    ram_claim: RamBytes = 0
    subordinates: Annotated[tuple[SubordinateWorker, ...], msgspec.Meta(max_length=MAX_GPUS_PER_REPLICA)] = ()
    total_layers: Layers | None = None
    offload_layers: Layers | None = None
    reason: str | None = None  # why it is PENDING / ERROR
    created_at: Time = 0.0
    cpu_claim: MilliCores = 0  # milli-cores on the main worker


class ModelFile(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Readiness of a model source's files on one worker."""

    source: Text
    worker: WorkerName
    state: ModelFileState
    progress: float = 0.0


class Reason(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Why one plugin rejected one subject (a worker, a GPU, or the whole request)."""

    plugin: str
    subject: str  # "w3", "w3/gpu1", or "" for the request as a whole
    message: str


class FilterReport(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What one filter did: kept k of n, and why it dropped each of the others."""

    filter: str
    kept: int
    total: int
    dropped: tuple[Reason, ...] = ()


class Decision(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A chosen placement with its score breakdown and the chain's reports."""

    model: str
    candidate: Candidate
    score: float
    breakdown: dict[str, float]
    filters: tuple[FilterReport, ...] = ()
    candidates_considered: int = 0


MAX_EXPLAINED = 16  # drop reasons per filter, and fit reasons, that a verdict carries (its counts stay whole)


class Unschedulable(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Why a replica cannot be placed now: filter counts and the best-effort fit message."""

    model: str
    message: str
    filters: tuple[FilterReport, ...] = ()
    reasons: tuple[Reason, ...] = ()

    @classmethod
    def of(cls, model: str, message: str, filters: Sequence[FilterReport] = (),
           reasons: Sequence[Reason] = ()) -> Unschedulable:
        """A verdict with at most ``MAX_EXPLAINED`` reasons per filter and fit reasons (each filter's kept and total
        stay whole): it travels once per replica, so a reason per worker made a 64-replica verdict on 1,200 workers
        larger than a NATS message may be."""
        return cls(model=model, message=message,
                   filters=tuple(f if len(f.dropped) <= MAX_EXPLAINED else msgspec.structs.replace(
                       f, dropped=f.dropped[:MAX_EXPLAINED]) for f in filters),
                   reasons=tuple(reasons[:MAX_EXPLAINED]))


PlacementResult = Decision | Unschedulable


class ResourceRequest(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What one replica needs, as estimated from its model spec (see ``requirements``)."""

    vram: int  # V: bytes the replica's GPUs must provide together for a full offload
    ram: int = 0  # RAM claimed on each worker of a GPU placement
    cpu: int = 0  # milli-cores claimed on each worker of a placement
    gpu_memory_utilization: float = 0.0  # > 0: claim this fraction of every GPU used (vLLM, SGLang)
    gpu_count: int | None = None  # world size asked for by parallel sizes or the GPU selector
    attention_heads: int | None = None  # tensor-parallel sizes must divide these (when known)
    vocab_size: int | None = None
    gguf: GgufSpec | None = None  # per-layer sizes for partial offload / CPU placements
    basis: str = ""  # how ``vram`` was obtained, for explanations


class FilterResult(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Output of the filter chain: surviving worker names (sorted) and one report per filter run."""

    model: str
    survivors: tuple[str, ...]
    reports: tuple[FilterReport, ...] = ()


class FitResult(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Output of fitting: the winning strategy's candidates, or why nothing fits."""

    model: str
    candidates: tuple[Candidate, ...] = ()
    strategy: str | None = None  # the strategy whose candidates these are
    reasons: tuple[Reason, ...] = ()  # strategies skipped or failed, with why
    message: str = ""  # best-effort explanation when nothing fits (spec §5)


class ScaleDownEntry(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One instance's keep-score on scale-down; the lowest are removed first."""

    instance_id: str
    score: float
    breakdown: dict[str, float]
