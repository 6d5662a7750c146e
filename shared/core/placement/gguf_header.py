"""Per-layer sizes of a GGUF model from its parsed header (``gguf.GGUFReader``).

The caller opens the file (I/O stays out of the core); this module only reads the reader's fields:
``<arch>.block_count``, the attention head counts and embedding length for the KV cache, and the byte
size of every tensor, split into ``blk.N.*`` layers and the rest.
"""

from __future__ import annotations

from typing import Any, Protocol

from shared.core.placement.domain import GgufSpec

KV_CACHE_BYTES = 2  # f16 K and V cache elements, llama.cpp's default


class _Field(Protocol):
    def contents(self) -> Any: ...


def _field(reader: Any, key: str) -> Any:
    field: _Field | None = reader.get_field(key)
    return None if field is None else field.contents()


def gguf_spec_from_reader(reader: Any, context_size: int | None = None) -> GgufSpec:
    """A GgufSpec from an open ``GGUFReader``; ``context_size`` defaults to the model's (capped at 8192).

    Raises ValueError when the header lacks the block count.
    """
    arch = _field(reader, "general.architecture") or "llama"
    layers = _field(reader, f"{arch}.block_count")
    if not layers:
        raise ValueError(f"GGUF header has no {arch}.block_count")
    layers = int(layers)
    layer_bytes = 0
    other = 0
    for tensor in reader.tensors:
        if str(tensor.name).startswith("blk."):
            layer_bytes += int(tensor.n_bytes)
        else:
            other += int(tensor.n_bytes)
    embed = int(_field(reader, f"{arch}.embedding_length") or 0)
    heads = int(_field(reader, f"{arch}.attention.head_count") or 0)
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv") or heads)
    head_dim = int(_field(reader, f"{arch}.attention.key_length") or (embed // heads if heads else 0))
    kv_per_token_layer = 2 * kv_heads * head_dim * KV_CACHE_BYTES
    trained = int(_field(reader, f"{arch}.context_length") or 8192)
    return GgufSpec(
        total_layers=layers,
        layer_bytes=-(-layer_bytes // layers),
        non_layer_bytes=other,
        kv_bytes_per_token_per_layer=kv_per_token_layer,
        context_size=context_size or min(trained, 8192),
    )
