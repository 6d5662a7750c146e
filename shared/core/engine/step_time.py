"""Step-time models: how long one engine step takes on the emulated GPU (spec §4).

Both models answer ``step_time(num_tokens, num_reqs, num_sampling, attn_work, kv_read)`` from the step's
integer aggregates, so a decode step and its fast-forwarded twin get bit-identical times.

Roofline, for scheduled chunks (q_i new tokens on c_i computed ones), T = Σ q_i, S = sampling sequences::

    FLOPs = 2·P_lin·T + 2·V·d·S + 4·L·n_q·h·Σ(q_i·c_i + q_i(q_i+1)/2)
    Bytes = b_w·(P_lin + V·d) + kv_tok·Σ(c_i + q_i)
    t     = max(FLOPs/(η_f·F), Bytes/(η_w·W)) / k + all-reduce(T, k) + t_overhead

with tensor parallel degree k. Mixture-of-experts models read only the experts a step touches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.core.catalog import GpuSpec, ModelArch
from shared.core.catalog.models import dtype_bytes

GIB = 1 << 30


class StepTimeModel(Protocol):
    """Seconds one engine step takes."""

    def step_time(self, num_tokens: int, num_reqs: int, num_sampling: int, attn_work: int, kv_read: int) -> float:
        """Duration of a step with these aggregates."""
        ...


@dataclass(frozen=True, slots=True)
class RooflineParams:
    """Efficiencies and fixed costs of the roofline (defaults from spec §4)."""

    eta_flops: float = 0.6
    eta_mem: float = 0.7
    overhead_s: float = 0.5e-3
    weight_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    allreduce_latency_s: float = 8e-6  # per all-reduce call (NCCL ring, small messages); assumption
    gpu_mem_utilization: float = 0.9
    activation_reserve_bytes: int = 2 * GIB  # per GPU: activations, CUDA graphs, sampler; assumption


class RooflineStepTime:
    """The roofline step-time model for one model on ``tp`` GPUs of one type."""

    __slots__ = (
        "_ar0",
        "_ar_tok",
        "_f_attn",
        "_f_samp",
        "_f_tok",
        "_m0",
        "_m_exp",
        "_m_kv",
        "_n_exp",
        "_ov",
        "_topk",
        "gpu",
        "model",
        "params",
        "tp",
    )

    def __init__(self, model: ModelArch, gpu: GpuSpec, tp: int = 1, params: RooflineParams | None = None) -> None:
        if tp < 1:
            raise ValueError("tp must be >= 1")
        p = params or RooflineParams()
        self.model, self.gpu, self.tp, self.params = model, gpu, tp, p
        bw = dtype_bytes(p.weight_dtype)
        flops = gpu.fp8_flops if bw <= 1 and gpu.fp8_flops else gpu.bf16_flops
        f_eff = p.eta_flops * flops * tp
        m_eff = p.eta_mem * gpu.mem_bw_bytes_s * tp
        d, vocab = model.hidden_size, model.vocab_size
        p_lin_active = model.linear_params_active
        p_lin_total = max(model.params_total - model.embedding_params, 0)
        self._f_tok = 2.0 * p_lin_active / f_eff
        self._f_samp = 2.0 * vocab * d / f_eff
        self._f_attn = 4.0 * model.num_layers * model.num_q_heads * model.head_dim / f_eff
        self._n_exp = model.num_experts
        self._topk = max(model.experts_per_token, 1)
        if model.num_experts:
            # expert weights: the part of the model beyond what one token touches, spread over experts
            spare = model.num_experts - self._topk
            routed = (p_lin_total - p_lin_active) / spare if spare > 0 else 0.0
            dense = p_lin_total - routed * model.num_experts
            self._m0 = bw * (dense + vocab * d) / m_eff
            self._m_exp = bw * routed / m_eff
        else:
            self._m0 = bw * (p_lin_total + vocab * d) / m_eff
            self._m_exp = 0.0
        self._m_kv = model.kv_bytes_per_token(p.kv_dtype) / m_eff
        if tp > 1:
            link = gpu.intra_node_bw_bytes_s or 25e9
            calls = 2 * model.num_layers  # after attention and after the MLP, every layer
            self._ar0 = calls * p.allreduce_latency_s
            self._ar_tok = calls * (2.0 * (tp - 1) / tp) * d * 2 / link  # bf16 activations, ring all-reduce
        else:
            self._ar0 = self._ar_tok = 0.0
        self._ov = p.overhead_s

    def step_time(self, num_tokens: int, num_reqs: int, num_sampling: int, attn_work: int, kv_read: int) -> float:
        """Duration of a step with these aggregates (seconds)."""
        f = self._f_tok * num_tokens + self._f_samp * num_sampling + self._f_attn * attn_work
        m = self._m0 + self._m_kv * kv_read
        if self._n_exp:
            m += self._m_exp * min(self._n_exp, num_tokens * self._topk)
        return (f if f > m else m) + self._ar0 + self._ar_tok * num_tokens + self._ov

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes over all layers (what a P/D hand-off moves per prompt token)."""
        return self.model.kv_bytes_per_token(self.params.kv_dtype)

    def kv_capacity_blocks(self, block_size: int = 16) -> int:
        """KV blocks that fit: (utilization × VRAM − weights − activation reserve) / (B × kv_tok), over tp."""
        p, k = self.params, self.tp
        free = p.gpu_mem_utilization * self.gpu.mem_bytes * k - self.model.weight_bytes(p.weight_dtype)
        free -= p.activation_reserve_bytes * k
        per_block = block_size * self.model.kv_bytes_per_token(p.kv_dtype)
        return max(int(free // per_block), 0)


@dataclass(frozen=True, slots=True)
class CalibratedStepTime:
    """The simple calibrated mode: a fixed step cost, a per-token cost and a per-sequence load cost.

    ``t = base_s + per_token_s·T + per_seq_s·R + per_kv_token_s·Σ(c+q)``. ``from_anchors`` fits it to three
    measured figures (unloaded TTFT of a prompt, ITL at batch 1, decode throughput at a large batch).
    """

    base_s: float
    per_token_s: float
    per_seq_s: float = 0.0
    per_kv_token_s: float = 0.0

    @classmethod
    def from_anchors(
        cls, ttft_s: float, prompt_len: int, itl_s: float, tokens_per_s: float, batch: int, context: int = 1024
    ) -> CalibratedStepTime:
        """Fit to: TTFT of ``prompt_len``, ITL at batch 1, and ``tokens_per_s`` at ``batch`` with ``context``."""
        per_token = max(ttft_s - itl_s, 0.0) / max(prompt_len - 1, 1)
        step_big = batch / tokens_per_s
        per_kv = max(step_big - itl_s - per_token * (batch - 1), 0.0) / max(batch * context, 1)
        return cls(base_s=itl_s - per_token, per_token_s=per_token, per_kv_token_s=per_kv)

    def step_time(self, num_tokens: int, num_reqs: int, num_sampling: int, attn_work: int, kv_read: int) -> float:
        """Duration of a step with these aggregates (seconds)."""
        return self.base_s + self.per_token_s * num_tokens + self.per_seq_s * num_reqs + self.per_kv_token_s * kv_read
