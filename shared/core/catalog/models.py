"""Model architecture facts derived from a Hugging Face ``config.json``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "fp8": 1, "float8": 1, "int8": 1,
    "int4": 0.5, "fp4": 0.5,
}


class ModelArch(msgspec.Struct, frozen=True, kw_only=True):
    """Shape of a decoder-only transformer, enough for memory sizing and a roofline step model."""

    key: str
    hf_model_id: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    params_total: int
    params_active: int  # per token; equals params_total for dense models
    kv_bytes_per_token_bf16: int  # K and V over all layers at 2 bytes per element
    num_experts: int = 0
    experts_per_token: int = 0
    mla: bool = False  # multi-head latent attention (DeepSeek): KV is a compressed latent

    @property
    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the LM head."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def linear_params_active(self) -> int:
        """Matmul parameters touched per token, excluding embeddings and the LM head."""
        return max(self.params_active - self.embedding_params, 0)

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        """Bytes of all weights stored at ``dtype``."""
        return int(self.params_total * dtype_bytes(dtype))

    def kv_bytes_per_token(self, kv_dtype: str = "bfloat16") -> int:
        """KV-cache bytes one token occupies across all layers."""
        return int(self.kv_bytes_per_token_bf16 * dtype_bytes(kv_dtype) / 2)


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a dtype name; raises ValueError for unknown names."""
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


def _dense_param_count(cfg: Mapping[str, Any], head_dim: int) -> int:
    """Exact parameter count of a dense Llama-style decoder (gated MLP, GQA, RMSNorm)."""
    d = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    n_q = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_q))
    inter = int(cfg["intermediate_size"])
    vocab = int(cfg["vocab_size"])
    q_out, kv_out = n_q * head_dim, n_kv * head_dim
    attn = d * q_out + 2 * d * kv_out + q_out * d
    if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2":
        attn += q_out + 2 * kv_out
    if cfg.get("model_type") == "qwen3":
        attn += 2 * head_dim  # per-head q/k norms
    per_layer = attn + 3 * d * inter + 2 * d
    embeddings = vocab * d * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + d


def arch_from_config(
    key: str, cfg: Mapping[str, Any], table_row: Mapping[str, str] | None = None
) -> ModelArch:
    """Build a :class:`ModelArch` from an HF config, using the derived table for MoE/MLA totals.

    Dense models get an exact parameter count from their shapes; mixture-of-experts and latent-attention
    models take the counts of ``model_table.csv`` (``est_params_*_B``), whose formulas cover them.
    """
    text = cfg.get("text_config", cfg)
    d = int(text["hidden_size"])
    n_q = int(text["num_attention_heads"])
    n_kv = int(text.get("num_key_value_heads", n_q))
    head_dim = int(text.get("head_dim") or d // n_q)
    layers = int(text["num_hidden_layers"])
    n_experts = int(text.get("num_local_experts") or text.get("n_routed_experts") or text.get("num_experts") or 0)
    per_tok = int(text.get("num_experts_per_tok") or text.get("num_experts_per_token") or 0)
    mla = "kv_lora_rank" in text
    if mla:
        kv_bf16 = layers * (int(text["kv_lora_rank"]) + int(text["qk_rope_head_dim"])) * 2
    else:
        kv_bf16 = 2 * layers * n_kv * head_dim * 2
    if n_experts == 0 and not mla and str(text.get("model_type", "")) in {"llama", "mistral", "qwen2", "qwen3"}:
        total = active = _dense_param_count(text, head_dim)
    elif table_row is not None:
        total = int(float(table_row["est_params_total_B"]) * 1e9)
        active = int(float(table_row["est_params_active_B"]) * 1e9)
    else:
        raise ValueError(f"{key}: parameter count needs the derived table for {text.get('model_type')!r}")
    return ModelArch(
        key=key,
        hf_model_id=str(table_row["hf_model_id"]) if table_row else key,
        model_type=str(text.get("model_type", "")),
        hidden_size=d,
        num_layers=layers,
        num_q_heads=n_q,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=int(text.get("intermediate_size") or 0),
        vocab_size=int(text["vocab_size"]),
        max_position_embeddings=int(text.get("max_position_embeddings") or 0),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        params_total=total,
        params_active=active,
        kv_bytes_per_token_bf16=kv_bf16,
        num_experts=n_experts,
        experts_per_token=per_tok,
        mla=mla,
    )
