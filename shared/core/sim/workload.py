"""One request of a replayed trace, independent of the trace's file format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """Arrival (seconds from trace start), prompt and output lengths, optional prefix-block ids.

    ``prefix_ids[i]`` names the content of prompt tokens ``[i·prefix_unit, (i+1)·prefix_unit)`` together
    with everything before it (Mooncake's chained 512-token block ids); equal ids mean a shared prefix.
    """

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_ids: tuple[int, ...] | None = None
    prefix_unit: int = 512
