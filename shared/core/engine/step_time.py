"""Step-time models: how long one engine step takes on the emulated GPU (spec §4, issue 14 item 2).

Both models answer ``step_time(num_tokens, num_reqs, num_sampling, attn_work, kv_read)`` from the step's
integer aggregates, so a decode step and its fast-forwarded twin get bit-identical times.

``RooflineStepTime`` is a per-operator roofline. For scheduled chunks (q_i new tokens on c_i computed
ones), T = Σ q_i, S = sequences sampling, on ``tp`` GPUs::

    GEMMs      ((2·P_lin·T / (η_gf·F))^p + (b_w·P_lin / (η_gw·W))^p)^(1/p)      compute vs weight reads
    LM head    the same with V·d parameters and S rows
    attention  L·(τ_attn + τ_seq·R + τ_pre·[a chunk has q > 1]) + 4·L·n_q·h·Σ(q_i·c_i + q_i(q_i+1)/2) / (η_af·F)
               + kv_tok·Σ(c_i + q_i) / (η_kv·W)
    elem-wise  L·τ_ew + L·d·T·ε_ew                                             norms, activation, residual
    t          (GEMMs + LM head + attention) / tp + elem-wise + all-reduce(T, tp) + t_host

with R the scheduled requests. The efficiencies (η_gf, η_gw, p, η_af, η_kv, τ_attn, τ_seq, τ_pre, τ_ew, ε_ew) are
per GPU, fitted by ``bench/calibrate_step_time.py`` to measured kernel tables (aiconfigurator-core's GEMM and attention
collections, vLLM backend) and shipped in ``step_calibration.json``; a GPU without calibration falls back to
the spec §4 efficiencies (η_f 0.6, η_w 0.7). ``t_host`` (scheduling, sampling, launch gaps that CUDA graphs
and async scheduling leave) is not in kernel tables: it is an assumption. Mixture-of-experts models read
only the experts a step touches.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Protocol, runtime_checkable

from shared.core.catalog import GpuSpec, ModelArch
from shared.core.catalog.models import dtype_bytes

GIB = 1 << 30
CALIBRATION_FILE = Path(__file__).with_name("step_calibration.json")


class StepTimeModel(Protocol):
    """Seconds one engine step takes."""

    def step_time(self, num_tokens: int, num_reqs: int, num_sampling: int, attn_work: int, kv_read: int) -> float:
        """Duration of a step with these aggregates."""
        ...


@runtime_checkable
class SplitStepTime(Protocol):
    """A model whose step time is ``fixed + a·attn_work + b·kv_read`` with ``fixed`` depending on the rest.

    ``step_time`` must compute exactly ``split(...)[0] + a * attn_work + b * kv_read`` in that order, so a
    fast-forwarded run of decode steps (same T, growing context) gets bit-identical times from one split.
    """

    def split(self, num_tokens: int, num_reqs: int, num_sampling: int) -> tuple[float, float, float]:
        """``(fixed seconds, seconds per unit of attention work, seconds per KV token read)``."""
        ...


@dataclass(frozen=True, slots=True)
class OperatorEfficiencies:
    """Per-GPU constants of the per-operator model (what ``bench/calibrate_step_time.py`` fits)."""

    gemm_flops: float = 0.6  # η of dense GEMM compute (fraction of peak bf16 FLOP/s)
    gemm_weights: float = 0.7  # η of weight reads by memory-bound GEMMs (fraction of HBM bandwidth)
    gemm_p: float = 8.0  # how sharply GEMMs switch between the two regimes (large = plain max)
    attn_flops: float = 0.6  # η of attention compute (prefill chunks)
    attn_kv: float = 0.7  # η of KV-cache reads (decode)
    attn_layer_s: float = 0.0  # fixed attention kernel time per layer (launch, tiny batches)
    attn_seq_s: float = 0.0  # attention time per sequence per layer (per-sequence work of the kernels)
    attn_prefill_layer_s: float = 0.0  # extra per-layer floor of a step with a prefill chunk (q > 1)
    ew_layer_s: float = 0.0  # fixed element-wise time per layer (norms, activation, residual)
    ew_element_s: float = 0.0  # element-wise seconds per token per layer per hidden unit
    host_s: float = 0.5e-3  # per step outside the kernels (assumption, not in kernel tables)

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> OperatorEfficiencies:
        """From a calibration entry (unknown keys are ignored, missing ones keep their default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in d.items() if k in names})


@cache
def _calibrations() -> dict[str, OperatorEfficiencies]:
    # static package data written by bench/calibrate_step_time.py, read once (like a module constant)
    data = json.loads(CALIBRATION_FILE.read_text()) if CALIBRATION_FILE.exists() else {"gpus": {}}
    return {k: OperatorEfficiencies.from_dict(v) for k, v in data["gpus"].items()}


def calibration_for(gpu_key: str) -> OperatorEfficiencies | None:
    """The fitted constants of a GPU (by catalogue key, e.g. ``h100_sxm``), or None if it has none."""
    return _calibrations().get(gpu_key)


@dataclass(frozen=True, slots=True)
class RooflineParams:
    """Fixed costs, dtypes and memory figures of the roofline (defaults from spec §4).

    ``eta_flops``/``eta_mem``/``overhead_s`` apply only to a GPU without a calibration entry (or when
    ``calibrated=False``); ``host_s`` overrides the calibrated host overhead when given.
    """

    eta_flops: float = 0.6
    eta_mem: float = 0.7
    overhead_s: float = 0.5e-3
    weight_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    allreduce_latency_s: float = 8e-6  # per all-reduce call (NCCL ring, small messages); assumption
    gpu_mem_utilization: float = 0.9
    activation_reserve_bytes: int = 2 * GIB  # per GPU: activations, CUDA graphs, sampler; assumption
    calibrated: bool = True  # use the GPU's fitted per-operator constants when there are some
    host_s: float | None = None


_FIXED_MEMO_MAX = 4096


class RooflineStepTime:
    """The per-operator roofline step-time model for one model on ``tp`` GPUs of one type."""

    __slots__ = (
        "_a0",
        "_a_f",
        "_a_kv",
        "_a_pre",
        "_a_seq",
        "_ar0",
        "_ar_tok",
        "_e0",
        "_e1",
        "_fixed_memo",
        "_g_c",
        "_g_exp",
        "_g_m",
        "_h_c",
        "_h_m",
        "_n_exp",
        "_ov",
        "_p",
        "_sqrt",
        "_topk",
        "eff",
        "gpu",
        "model",
        "params",
        "tp",
    )

    def __init__(
        self,
        model: ModelArch,
        gpu: GpuSpec,
        tp: int = 1,
        params: RooflineParams | None = None,
        efficiencies: OperatorEfficiencies | None = None,
    ) -> None:
        if tp < 1:
            raise ValueError("tp must be >= 1")
        p = params or RooflineParams()
        self.model, self.gpu, self.tp, self.params = model, gpu, tp, p
        self._fixed_memo: dict[tuple[int, int, int], float] = {}
        eff = efficiencies or (calibration_for(gpu.key) if p.calibrated else None)
        if eff is None:
            eff = OperatorEfficiencies(
                gemm_flops=p.eta_flops,
                gemm_weights=p.eta_mem,
                attn_flops=p.eta_flops,
                attn_kv=p.eta_mem,
                host_s=p.overhead_s,
            )
        if p.host_s is not None:
            eff = OperatorEfficiencies(**{**{f.name: getattr(eff, f.name) for f in fields(eff)}, "host_s": p.host_s})
        self.eff = eff
        bw = dtype_bytes(p.weight_dtype)
        flops = (gpu.fp8_flops if bw <= 1 and gpu.fp8_flops else gpu.bf16_flops) * tp
        mem = gpu.mem_bw_bytes_s * tp
        d, vocab, layers = model.hidden_size, model.vocab_size, model.num_layers
        p_lin_active = model.linear_params_active
        p_lin_total = max(model.params_total - model.embedding_params, 0)
        self._g_c = 2.0 * p_lin_active / (eff.gemm_flops * flops)
        self._n_exp = model.num_experts
        self._topk = max(model.experts_per_token, 1)
        if model.num_experts:
            # expert weights: the part of the model beyond what one token touches, spread over experts
            spare = model.num_experts - self._topk
            routed = (p_lin_total - p_lin_active) / spare if spare > 0 else 0.0
            dense = p_lin_total - routed * model.num_experts
            self._g_m = bw * dense / (eff.gemm_weights * mem)
            self._g_exp = bw * routed / (eff.gemm_weights * mem)
        else:
            self._g_m = bw * p_lin_total / (eff.gemm_weights * mem)
            self._g_exp = 0.0
        self._h_c = 2.0 * vocab * d / (eff.gemm_flops * flops)
        self._h_m = bw * vocab * d / (eff.gemm_weights * mem)
        self._p = eff.gemm_p
        self._sqrt = eff.gemm_p == 2.0
        self._a0 = layers * eff.attn_layer_s
        self._a_seq = layers * eff.attn_seq_s / tp
        self._a_pre = layers * eff.attn_prefill_layer_s
        self._a_f = 4.0 * layers * model.num_q_heads * model.head_dim / (eff.attn_flops * flops)
        self._a_kv = model.kv_bytes_per_token(p.kv_dtype) / (eff.attn_kv * mem)
        self._e0 = layers * eff.ew_layer_s
        self._e1 = layers * d * eff.ew_element_s
        if tp > 1:
            link = gpu.intra_node_bw_bytes_s or 25e9
            calls = 2 * layers  # after attention and after the MLP, every layer
            self._ar0 = calls * p.allreduce_latency_s
            self._ar_tok = calls * (2.0 * (tp - 1) / tp) * d * 2 / link  # bf16 activations, ring all-reduce
        else:
            self._ar0 = self._ar_tok = 0.0
        self._ov = eff.host_s

    def _blend(self, c: float, m: float) -> float:
        """Compute-bound and memory-bound times of one GEMM family, joined smoothly."""
        if self._sqrt:
            return math.sqrt(c * c + m * m)
        p = self._p
        return float((c**p + m**p) ** (1.0 / p))

    def operator_times(
        self, num_tokens: int, num_reqs: int, num_sampling: int, attn_work: int, kv_read: int
    ) -> dict[str, float]:
        """Seconds per operator family of one step (what ``step_time`` adds up)."""
        m = self._g_m
        if self._n_exp:
            m += self._g_exp * min(self._n_exp, num_tokens * self._topk)
        gemm = self._blend(self._g_c * num_tokens, m) if num_tokens else 0.0
        logits = self._blend(self._h_c * num_sampling, self._h_m) if num_sampling else 0.0
        attn = self._a0 + self._a_seq * num_reqs + self._a_f * attn_work + self._a_kv * kv_read if num_tokens else 0.0
        if attn_work > kv_read:  # some chunk computes more than one token: a prefill
            attn += self._a_pre
        ew = self._e0 + self._e1 * num_tokens if num_tokens else 0.0
        comm = self._ar0 + self._ar_tok * num_tokens if num_tokens else 0.0
        return {"gemm": gemm, "logits": logits, "attention": attn, "elementwise": ew, "allreduce": comm,
                "host": self._ov}

    def _fixed(self, num_tokens: int, num_reqs: int, num_sampling: int) -> float:
        # a real-time driver asks for the same batch shape step after step (decode): remember the last few
        # thousand shapes rather than redo the powers and roots
        key = (num_tokens, num_reqs, num_sampling)
        memo = self._fixed_memo
        t = memo.get(key)
        if t is None:
            if len(memo) >= _FIXED_MEMO_MAX:
                memo.clear()
            t = memo[key] = self._fixed_uncached(num_tokens, num_reqs, num_sampling)
        return t

    def _fixed_uncached(self, num_tokens: int, num_reqs: int, num_sampling: int) -> float:
        c = self._g_c * num_tokens
        m = self._g_m
        if self._n_exp:
            m += self._g_exp * min(self._n_exp, num_tokens * self._topk)
        if self._sqrt:
            t = math.sqrt(c * c + m * m)
            if num_sampling:
                h = self._h_c * num_sampling
                t += math.sqrt(h * h + self._h_m * self._h_m)
        else:
            p = self._p
            t = (c**p + m**p) ** (1.0 / p)
            if num_sampling:
                t += ((self._h_c * num_sampling) ** p + self._h_m**p) ** (1.0 / p)
        t += self._a0 + self._a_seq * num_reqs + self._e0 + self._e1 * num_tokens
        return float(t + self._ar0 + self._ar_tok * num_tokens + self._ov)

    def split(self, num_tokens: int, num_reqs: int, num_sampling: int) -> tuple[float, float, float]:
        """``step_time = fixed + a·attn_work + b·kv_read`` (see :class:`SplitStepTime`)."""
        return self._fixed(num_tokens, num_reqs, num_sampling), self._a_f, self._a_kv

    def step_time(self, num_tokens: int, num_reqs: int, num_sampling: int, attn_work: int, kv_read: int) -> float:
        """Duration of a step with these aggregates (seconds)."""
        t = self._fixed(num_tokens, num_reqs, num_sampling) + self._a_f * attn_work + self._a_kv * kv_read
        # attn_work exceeds kv_read only when a chunk computes more than one token (never in a pure decode step,
        # so the split stays exact for fast-forwarded runs)
        return t + self._a_pre if attn_work > kv_read else t

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

    def split(self, num_tokens: int, num_reqs: int, num_sampling: int) -> tuple[float, float, float]:
        """``step_time = fixed + 0·attn_work + per_kv_token_s·kv_read`` (see :class:`SplitStepTime`)."""
        return self.base_s + self.per_token_s * num_tokens + self.per_seq_s * num_reqs, 0.0, self.per_kv_token_s

    def step_time(self, num_tokens: int, num_reqs: int, num_sampling: int, attn_work: int, kv_read: int) -> float:
        """Duration of a step with these aggregates (seconds)."""
        return self.base_s + self.per_token_s * num_tokens + self.per_seq_s * num_reqs + self.per_kv_token_s * kv_read
