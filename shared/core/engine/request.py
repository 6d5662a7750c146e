"""A request as the engine sees it: token counters, KV blocks, timing, and its predetermined outcome."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum, StrEnum

from shared.core.engine.pd import KVHandoff
from shared.core.kv_events import ROOT_HASH, chain_root, lora_int_id


class RequestStatus(IntEnum):
    """Where a request is in its life."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue after a recompute preemption
    FINISHED = 3
    WAITING_FOR_REMOTE_KVS = 4  # decode side of P/D: blocks allocated, KV still crossing the link


class FinishReason(StrEnum):
    """Why a request stopped (``stop`` covers EOS and stop tokens, as in the OpenAI API)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Request:
    """One inference request.

    Prompt content comes in one of three forms: ``prompt_token_ids`` (replay, server), ``prefix_ids`` of
    ``prefix_unit``-token blocks from a trace (equal ids = equal content), or only ``prompt_len`` (content
    unique to the request). ``sampled_token_ids`` are the tokens the model will sample, in order; past
    their end the model samples ``filler_token``. Because outputs are known up front, the stop checks run
    once at admission and each step only compares a counter.
    """

    __slots__ = (
        "all_token_ids",
        "arrival_time",
        "block_hashes",
        "block_ids",
        "cache_salt",
        "eos_token_id",
        "filler_token",
        "finish_at",
        "finish_reason",
        "finish_time",
        "first_scheduled_time",
        "first_token_time",
        "hash_root",
        "ignore_eos",
        "kv_handoff",
        "kv_pending",
        "kv_ready_at",
        "last_token_time",
        "lora",
        "lora_id",
        "max_tokens",
        "min_tokens",
        "next_full",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_output_tokens",
        "num_preemptions",
        "num_slots",
        "num_tokens",
        "planned_finish",
        "prefix_ids",
        "prefix_unit",
        "priority",
        "prompt_len",
        "req_id",
        "sampled_token_ids",
        "status",
        "stop_reason",
        "stop_token_ids",
        "uid",
    )

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: Sequence[int] | None = None,
        *,
        max_tokens: int,
        prompt_len: int | None = None,
        prefix_ids: Sequence[int] | None = None,
        prefix_unit: int = 512,
        min_tokens: int = 0,
        stop_token_ids: Sequence[int] = (),
        eos_token_id: int | None = None,
        ignore_eos: bool = False,
        priority: int = 0,
        arrival_time: float = 0.0,
        sampled_token_ids: Sequence[int] | None = None,
        filler_token: int = 0,
        cache_salt: int = ROOT_HASH,
        lora: str | None = None,
        remote_prefill: bool = False,
        uid: int = -1,
    ) -> None:
        if prompt_token_ids is not None:
            self.all_token_ids: list[int] | None = list(prompt_token_ids)
            self.prompt_len = len(self.all_token_ids)
        else:
            if prompt_len is None:
                raise ValueError(f"request {req_id}: give prompt_token_ids or prompt_len")
            self.all_token_ids = None
            self.prompt_len = prompt_len
        self.req_id = req_id
        self.uid = uid
        self.prefix_ids = list(prefix_ids) if prefix_ids is not None else None
        self.prefix_unit = prefix_unit
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.eos_token_id = eos_token_id
        self.ignore_eos = ignore_eos
        self.priority = priority
        self.arrival_time = arrival_time
        self.sampled_token_ids = list(sampled_token_ids) if sampled_token_ids is not None else None
        self.filler_token = filler_token
        self.cache_salt = cache_salt
        self.lora = lora
        self.lora_id = lora_int_id(lora) if lora is not None else None
        self.hash_root = chain_root(cache_salt, self.lora_id)  # parent hash of the first block
        self.kv_pending = remote_prefill  # P/D decode side: the prompt's KV comes from a prefill engine
        self.kv_ready_at = -1.0  # when that KV has arrived (set on admission)
        self.kv_handoff: KVHandoff | None = None  # P/D prefill side: set when the request finishes
        self.status = RequestStatus.WAITING
        self.num_tokens = self.prompt_len
        self.num_output_tokens = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # set when first scheduled
        self.num_cached_blocks = 0  # leading blocks of block_ids already registered in the prefix cache
        self.num_preemptions = 0
        self.num_slots = 0  # tokens the held blocks can store: len(block_ids) * block_size
        self.next_full = 0  # computed-token count at which the next block becomes cacheable
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.finish_at = 0  # output length at which the request stops; set on admission
        self.finish_reason: FinishReason | None = None
        self.planned_finish: tuple[FinishReason, int | None] = (FinishReason.LENGTH, None)
        self.stop_reason: int | None = None
        self.first_scheduled_time = -1.0
        self.first_token_time = -1.0
        self.last_token_time = -1.0  # set with the first token and again at finish (kept off the hot path)
        self.finish_time = -1.0

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, out={self.num_output_tokens})"
        )

    @property
    def output_token_ids(self) -> list[int]:
        """Tokens sampled so far (known token content only; trace requests report their count only)."""
        if self.all_token_ids is not None:
            return self.all_token_ids[self.prompt_len :]
        return [self.token_at(i) for i in range(self.num_output_tokens)]

    def token_at(self, k: int) -> int:
        """The k-th output token the model samples (0-based)."""
        s = self.sampled_token_ids
        return s[k] if s is not None and k < len(s) else self.filler_token

    @property
    def queue_time(self) -> float:
        """Seconds from arrival to first scheduling."""
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float:
        """Seconds from arrival to the first output token."""
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float:
        """Seconds from arrival to finish."""
        return self.finish_time - self.arrival_time

    @property
    def mean_itl(self) -> float:
        """Mean inter-token latency (TPOT) after the first token; 0 for a single-token output."""
        n = self.num_output_tokens
        return (self.last_token_time - self.first_token_time) / (n - 1) if n > 1 else 0.0
