"""Scheduler configuration (the knobs of vLLM's scheduler and cache config that the emulator honours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.core.roles import NodeRole

Policy = Literal["fcfs", "priority"]
POLICIES: tuple[str, ...] = ("fcfs", "priority")
UNLIMITED_LEN = 1 << 40


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Budgets and switches of one engine; ``validate`` lists what is wrong instead of failing late."""

    block_size: int = 16
    num_gpu_blocks: int = 10_000
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    policy: Policy = "fcfs"
    long_prefill_token_threshold: int = 0
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None
    enable_kv_events: bool = False  # record BlockStored/BlockRemoved/AllBlocksCleared (vLLM's KV events)
    max_loras: int = 0  # LoRA adapters one batch may use (vLLM's max_loras); 0 = LoRA off
    max_cpu_loras: int | None = None  # adapters kept loaded (vLLM's max_cpu_loras); default max_loras
    role: NodeRole = NodeRole.MIXED  # P/D: prefill-only engines finish requests after their prefill

    def problems(self) -> list[str]:
        """Every violated constraint, as readable sentences (empty when the config is usable)."""
        out: list[str] = []
        if self.block_size < 1:
            out.append(f"block_size must be >= 1 (got {self.block_size})")
        if self.num_gpu_blocks < 2:
            out.append(f"num_gpu_blocks must be >= 2: block 0 is reserved (got {self.num_gpu_blocks})")
        if self.max_num_seqs < 1:
            out.append(f"max_num_seqs must be >= 1 (got {self.max_num_seqs})")
        if self.max_num_batched_tokens < 1:
            out.append(f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens})")
        if self.policy not in POLICIES:
            out.append(f"policy must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        if self.long_prefill_token_threshold < 0:
            out.append(f"long_prefill_token_threshold must be >= 0 (got {self.long_prefill_token_threshold})")
        if self.max_loras < 0:
            out.append(f"max_loras must be >= 0 (got {self.max_loras})")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            out.append(f"max_cpu_loras must be >= max_loras (got {self.max_cpu_loras} < {self.max_loras})")
        if self.max_model_len is not None and self.max_model_len < 2:
            out.append(f"max_model_len must be >= 2 (got {self.max_model_len})")
        return out

    @property
    def lora_cache_size(self) -> int:
        """Adapters kept loaded between uses (``max_cpu_loras``, at least ``max_loras``)."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    @property
    def model_len_limit(self) -> int:
        """``max_model_len``, or a practically unlimited length when unset."""
        return self.max_model_len if self.max_model_len is not None else UNLIMITED_LEN
