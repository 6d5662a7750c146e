"""Prefill/decode disaggregation in the engine core: the KV hand-off and the link it crosses.

A *prefill* engine (``NodeRole.PREFILL``) runs each request's prefill, samples its first token, finishes it
(reason ``length``, as vLLM's P/D proxy sends the prefill request with ``max_tokens=1``) and keeps its KV
blocks until the decode side has pulled them (vLLM delays freeing them until the connector reports the
send finished). The finished request carries a :class:`KVHandoff` for the decode side.

A *decode* engine admits a request that has ``remote_prefill`` by allocating blocks for the whole prompt
and parking it as ``WAITING_FOR_REMOTE_KVS`` (it holds blocks, runs nothing and does not count against
``max_num_seqs``); when the transfer is done it recomputes only the last prompt token, which yields the
first output token (vLLM: ``num_computed_tokens = num_tokens - 1`` after the KV arrived). Local prefix-cache
hits on the decode side are not transferred. Transfer time = bytes / link bandwidth + latency, with bytes =
tokens × the model's KV bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVLink:
    """The link KV caches cross between a prefill and a decode engine."""

    bandwidth_bytes_s: float  # e.g. 50e9 for a 400 Gb/s RDMA NIC, ~400e9 within an NVLink domain
    latency_s: float = 0.0  # per transfer: connection set-up, descriptor exchange (assumption)

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_s > 0:
            raise ValueError(f"bandwidth_bytes_s must be > 0 (got {self.bandwidth_bytes_s})")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0 (got {self.latency_s})")

    def transfer_s(self, num_bytes: int) -> float:
        """Seconds to move ``num_bytes`` (0 bytes take no time)."""
        return self.latency_s + num_bytes / self.bandwidth_bytes_s if num_bytes > 0 else 0.0


@dataclass(frozen=True, slots=True)
class KVHandoff:
    """What a prefill engine hands to the decode side for one finished request."""

    req_id: str
    num_tokens: int  # prompt tokens whose KV is ready
    num_bytes: int
    ready_at: float  # engine time the prefill finished (the transfer may start)
    first_token: int | None  # the token the prefill sampled (vLLM's proxy discards it; decode re-samples)
