"""Placement domain: workers and GPUs, model specs, instances, candidates, decisions and reasons.

Sizes are integers in bytes and times are seconds on the caller's clock (the core never reads one).
These structs cross service boundaries as msgspec JSON, so fields are added with defaults, never
renamed. They are immutable values that never form reference cycles, so they are kept out of Python's
cycle collector (``gc=False``): services decode thousands a second, and every tracked object lengthens
the collector's pauses.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Protocol

import msgspec

GIB = 1 << 30


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

    index: int
    vendor: str = "cuda"  # cuda | rocm | metal | cpu ...
    product: str = ""  # e.g. H100-SXM-80GB
    vram_total: int
    vram_used: int = 0  # reported by the worker: every process, Gantry-managed or not
    runtime_version: str = ""
    labels: dict[str, str] = {}
    schedulable: bool = True  # False cordons this GPU alone


class Worker(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A machine that runs model instances, as of its latest heartbeat."""

    name: str
    cluster: str = "default"
    labels: dict[str, str] = {}
    gpus: tuple[Gpu, ...] = ()
    ram_total: int = 0
    ram_used: int = 0
    # CPU in milli-cores (1000 = one core); 0 = not reported, and CPU is then not checked on this worker
    cpu_total: int = 0
    cpu_used: int = 0
    last_heartbeat: float = 0.0
    cordoned: bool = False
    local_paths: tuple[str, ...] = ()


class GpuUsage(msgspec.Struct, frozen=True, kw_only=True, gc=False, array_like=True):
    """VRAM in use on one GPU (every process, Gantry-managed or not)."""

    index: int
    vram_used: int


class WorkerUsage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A worker's latest reported usage: RAM and VRAM per GPU index (what a heartbeat carries and the state
    layer keeps; fields a heartbeat adds beyond these are ignored when read back)."""

    worker: str
    ram_used: int = 0
    gpus: tuple[GpuUsage, ...] = ()


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

    gpu_ids: tuple[str, ...] = ()  # "worker:index"
    gpus_per_replica: int | None = None
    gpu_type: str | None = None  # product name, e.g. "H100-SXM-80GB"
    labels: dict[str, str] = {}  # every label must equal the GPU's own label


class GgufSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Per-layer sizes of a GGUF model (from the file header, or given)."""

    total_layers: int
    layer_bytes: int
    non_layer_bytes: int
    kv_bytes_per_token_per_layer: int
    context_size: int = 8192


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

    name: str
    source: str = ""  # hub repo id or local path; a ".gguf" file marks a GGUF model
    backend: Backend = Backend.VLLM
    backend_version: str = ""
    backend_parameters: tuple[str, ...] = ()  # e.g. ("--tensor-parallel-size=2",)
    categories: tuple[Category, ...] = (Category.LLM,)
    replicas: int = 1
    placement_strategy: PlacementStrategy = PlacementStrategy.AUTO
    cluster: str = "default"
    worker_selector: dict[str, str] = {}
    gpu_selector: GpuSelector | None = None
    distributed_inference_across_workers: bool = False
    cpu_offloading: bool = False
    vram_claim: int | None = None  # explicit per-replica VRAM; wins over estimates
    ram_claim: int | None = None
    cpu_claim: int | None = None  # milli-cores each worker of a replica needs
    weight_bytes: int | None = None  # W, when not derivable from a known config
    catalog_model: str | None = None  # key in the model-config catalogue, when the name is not one
    dtype: str = "bfloat16"
    gguf: GgufSpec | None = None
    restart: RestartPolicy = RestartPolicy()  # what happens to failed (ERROR) replicas


class SubordinateWorker(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Another worker's share of a multi-worker instance."""

    worker: str
    gpu_indexes: tuple[int, ...]
    vram_claims: tuple[int, ...]  # parallel to gpu_indexes
    ram_claim: int = 0
    cpu_claim: int = 0  # milli-cores


class Candidate(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One feasible placement of a replica, as produced by a fit strategy."""

    worker: str
    gpu_indexes: tuple[int, ...]
    vram_claims: tuple[int, ...]  # parallel to gpu_indexes
    ram_claim: int = 0
    subordinates: tuple[SubordinateWorker, ...] = ()
    strategy: str = ""  # the fit strategy that produced it
    total_layers: int | None = None
    offload_layers: int | None = None
    overcommit: str | None = None  # why this manual placement overcommits, if it does
    cpu_claim: int = 0  # milli-cores on the main worker (subordinates carry their own)


class Instance(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One replica of a model and what it holds."""

    id: str
    model: str
    state: InstanceState = InstanceState.PENDING
    worker: str | None = None
    gpu_indexes: tuple[int, ...] = ()
    vram_claims: tuple[int, ...] = ()
    ram_claim: int = 0
    subordinates: tuple[SubordinateWorker, ...] = ()
    total_layers: int | None = None
    offload_layers: int | None = None
    reason: str | None = None  # why it is PENDING / ERROR
    created_at: float = 0.0
    cpu_claim: int = 0  # milli-cores on the main worker


class ModelFile(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Readiness of a model source's files on one worker."""

    source: str
    worker: str
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


class Unschedulable(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Why a replica cannot be placed now: filter counts and the best-effort fit message."""

    model: str
    message: str
    filters: tuple[FilterReport, ...] = ()
    reasons: tuple[Reason, ...] = ()


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
