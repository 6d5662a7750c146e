"""Resource requirements of one replica: explicit claims, safetensors estimates, utilisation, GGUF layers.

``V = W × 1.2 + overhead`` (2 GiB for LLMs, 0.5 GiB otherwise) for safetensors-style models, where the
weight bytes ``W`` come from the spec or the catalogue architecture. An unknown ``W`` is a rejection with
a reason, never a zero (the baseline's zero places models on GPUs far too small).
"""

from __future__ import annotations

from shared.core.catalog.models import ModelArch, dtype_bytes
from shared.core.limits import MAX_CONTEXT, MAX_MODEL_BYTES
from shared.core.placement.domain import (
    GIB,
    Backend,
    Category,
    GgufSpec,
    ModelSpec,
    Reason,
    ResourceRequest,
)
from shared.core.placement.parameters import float_parameter, int_parameter, tensor_parallel_size, world_size

PLUGIN = "requirements"
LLM_OVERHEAD = 2 * GIB
OTHER_OVERHEAD = GIB // 2
VLLM_DEFAULT_UTILIZATION = 0.9
SGLANG_DEFAULT_FRACTION = 0.85
_UTILIZATION_CATEGORIES = frozenset({Category.LLM, Category.SPEECH_TO_TEXT})


def is_gguf(model: ModelSpec) -> bool:
    """A GGUF model: llama.cpp backend, a ``.gguf`` source, or given per-layer sizes."""
    return model.backend == Backend.LLAMA_CPP or model.source.lower().endswith(".gguf") or model.gguf is not None


def utilization(model: ModelSpec) -> float:
    """The fraction of each GPU the backend claims, or 0 when it claims only what it needs."""
    if not any(c in _UTILIZATION_CATEGORIES for c in model.categories):
        return 0.0  # embedding / reranker models claim V, not a fraction
    params = model.backend_parameters
    if model.backend == Backend.VLLM:
        value = float_parameter(params, ["gpu-memory-utilization"])
        return VLLM_DEFAULT_UTILIZATION if value is None else value
    if model.backend == Backend.SGLANG:
        value = float_parameter(params, ["mem-fraction-static"])
        return SGLANG_DEFAULT_FRACTION if value is None else value
    return 0.0


def weight_estimate(weight_bytes: int, model: ModelSpec) -> int:
    """``V = W × 1.2 + overhead`` in bytes."""
    overhead = LLM_OVERHEAD if Category.LLM in model.categories else OTHER_OVERHEAD
    return int(weight_bytes * 1.2) + overhead


def gguf_layer_vram(spec: GgufSpec) -> int:
    """VRAM one offloaded layer needs: its weights plus its KV cache for the context."""
    return spec.layer_bytes + spec.kv_bytes_per_token_per_layer * spec.context_size


def gguf_full_vram(spec: GgufSpec) -> int:
    """VRAM for a full offload: every layer plus the non-layer weights."""
    return spec.non_layer_bytes + spec.total_layers * gguf_layer_vram(spec)


def gguf_partial(spec: GgufSpec, layers_on_gpu: int) -> tuple[int, int]:
    """(VRAM, RAM) with ``layers_on_gpu`` layers offloaded; the rest and the non-layer weights stay in RAM."""
    per_layer = gguf_layer_vram(spec)
    vram = layers_on_gpu * per_layer
    ram = spec.non_layer_bytes + (spec.total_layers - layers_on_gpu) * per_layer
    return vram, ram


def gguf_cpu_ram(spec: GgufSpec) -> int:
    """RAM for a CPU-only placement."""
    return gguf_partial(spec, 0)[1]


def tp_divisible(size: int, request: ResourceRequest) -> bool:
    """Whether ``size`` is a valid tensor-parallel size: it divides the heads and the vocabulary (if known)."""
    if size < 1:
        return False
    if request.attention_heads is not None and request.attention_heads % size:
        return False
    return not (request.vocab_size is not None and request.vocab_size % size)


def derived_gpus_per_replica(gpu_ids: tuple[str, ...], replicas: int) -> int:
    """GPUs per replica when GPUs are selected by id but no count is given, as GPUStack derives it: the
    largest power of two not above ``selected GPUs // replicas`` (GPUStack's ``set_model_gpus_per_replica``;
    parallel sizes in the backend parameters win over it). Duplicate ids count once; at least 1."""
    per = len(set(gpu_ids)) // max(replicas, 1)
    size = 1
    while size * 2 <= per:
        size *= 2
    return size


def _reject(message: str) -> Reason:
    return Reason(plugin=PLUGIN, subject="", message=message)


def estimate(
    model: ModelSpec, arch: ModelArch | None = None, gguf: GgufSpec | None = None
) -> ResourceRequest | Reason:
    """Estimate what one replica of ``model`` needs.

    ``arch`` is the catalogue architecture for the model (the caller looks it up; the core does no I/O) and
    ``gguf`` the per-layer sizes read from a GGUF header, when available. Explicit claims win. Returns a
    Reason when the size cannot be known or the parameters are invalid.
    """
    params = model.backend_parameters
    try:
        gmu = utilization(model)
        size = world_size(params)
        tp = tensor_parallel_size(params)
        ctx_size = int_parameter(params, ["ctx-size", "c", "context-size"])
    except ValueError as err:
        return _reject(str(err))
    if not 0.0 <= gmu <= 1.0:
        return _reject(f"GPU memory utilization must be within 0..1, got {gmu}")
    selector = model.gpu_selector
    if size is None and selector is not None and selector.gpus_per_replica:
        size = selector.gpus_per_replica
    elif size is None and selector is not None and selector.gpu_ids:
        size = derived_gpus_per_replica(selector.gpu_ids, model.replicas)
    heads = arch.num_q_heads if arch else None
    vocab = arch.vocab_size if arch else None
    if ctx_size is not None and not 0 <= ctx_size <= MAX_CONTEXT:  # 0: the model's own context, as llama.cpp
        return _reject(f"--ctx-size must be within 0..{MAX_CONTEXT}, got {ctx_size}")
    layers = model.gguf or gguf
    if layers is not None and ctx_size:
        layers = GgufSpec(
            total_layers=layers.total_layers,
            layer_bytes=layers.layer_bytes,
            non_layer_bytes=layers.non_layer_bytes,
            kv_bytes_per_token_per_layer=layers.kv_bytes_per_token_per_layer,
            context_size=ctx_size,
        )
    ram = model.ram_claim or 0
    cpu = model.cpu_claim or 0
    if ram < 0 or cpu < 0:
        return _reject("ram_claim and cpu_claim must not be negative")
    if model.vram_claim is not None:
        vram, basis = model.vram_claim, "explicit vram_claim"
    elif is_gguf(model):
        if layers is None:
            return _reject(
                f"model size unknown: {model.name} is a GGUF model but no file header or gguf layer sizes "
                "were given"
            )
        vram, basis = gguf_full_vram(layers), f"GGUF {layers.total_layers} layers, context {layers.context_size}"
    else:
        if model.weight_bytes is not None:
            weights, basis = model.weight_bytes, "weight_bytes"
        elif arch is not None:
            try:
                weights = arch.weight_bytes(model.dtype)
            except ValueError as err:
                return _reject(str(err))
            basis = f"catalogue {arch.key} at {model.dtype} ({dtype_bytes(model.dtype):g} B/param)"
        else:
            return _reject(
                f"model size unknown: neither {model.name!r} nor its source {model.source!r} is in the model "
                "catalogue and it has no weight_bytes or vram_claim; refusing to guess (fix: a `source` or "
                "`catalog_model` from `gantry catalog`, or `weight_bytes`)"
            )
        vram = weight_estimate(weights, model)
    if not 0 <= vram <= MAX_MODEL_BYTES:  # what any GPUs could hold; past it the fitters' int64 columns overflow
        return _reject(f"a replica would need {gib(vram)} GiB of VRAM ({basis}): outside 0..{gib(MAX_MODEL_BYTES)}")
    if tp is not None and (
        (heads is not None and heads % tp) or (vocab is not None and vocab % tp)
    ):
        return _reject(
            f"--tensor-parallel-size={tp} does not divide the {heads} attention heads / {vocab} vocabulary"
        )
    return ResourceRequest(
        vram=vram,
        ram=ram,
        cpu=cpu,
        gpu_memory_utilization=gmu,
        gpu_count=size,
        attention_heads=heads,
        vocab_size=vocab,
        gguf=layers,
        basis=basis,
    )


def gib(value: int | float) -> str:
    """Bytes as GiB with two decimals, as explanations print them."""
    return f"{value / GIB:.2f}"


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling division for a positive divisor."""
    return -(-a // b)
