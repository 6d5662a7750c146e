"""Roles an engine node plays in prefill/decode disaggregation, shared by routing and queueing.

One home for the notion, so the router's P/D profile and the splitwise broker agree on what a node
does and how its load is counted: prefill load is the prompt tokens a node still has to prefill,
decode load is the requests it is decoding (FastDeploy's splitwise scheduler counts them this way;
see ``../shared/research/queueing-fastdeploy.md``).
"""

from __future__ import annotations

import enum


class NodeRole(enum.StrEnum):
    """What an engine node does with a request."""

    MIXED = "mixed"  # prefill and decode on the same node (aggregated serving)
    PREFILL = "prefill"  # prefill only; hands the KV cache to a decode node
    DECODE = "decode"  # decode only; waits for the KV cache from a prefill node

    @property
    def prefills(self) -> bool:
        """True when the node runs prefill."""
        return self is not NodeRole.DECODE

    @property
    def decodes(self) -> bool:
        """True when the node runs decode."""
        return self is not NodeRole.PREFILL
