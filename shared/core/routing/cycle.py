"""Per-request scratch space of one routing cycle: what several plugins need is computed once.

The chain of block hashes and each index's match are memoised here, so the affinity filter, the prefix
scorer and the token-load scorer of every profile of the cycle share one hashing pass and one walk.
"""

from __future__ import annotations

import random
from itertools import compress, repeat
from operator import mul, sub
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shared.core.routing.domain import EndpointState, PoolColumns, RouteRequest
from shared.core.routing.hashing import BlockHashes, match_lazily
from shared.core.routing.state import PoolState

PrefixSource = Literal["approximate", "precise", "hybrid"]
PREFIX_SOURCES: tuple[str, ...] = ("approximate", "precise", "hybrid")
COLUMNS_FROM = 32
"""Candidate lists at least this long are read from the pool's numpy columns; shorter ones endpoint by endpoint:
each numpy call costs a few microseconds whatever its length, and on a short list the calls cost more than the walks
they save (one endpoint behind Envoy: ~65 µs more per cold decision in the picker)."""


def wide(n: int) -> bool:
    """Whether a list of ``n`` candidates is read from the columns (``COLUMNS_FROM``)."""
    return n >= COLUMNS_FROM


class Cycle:
    """One request being routed at ``now`` against ``state``."""

    __slots__ = ("_chain", "_holders", "_lists", "_matches", "_positions", "now", "request", "rng", "state")

    def __init__(self, request: RouteRequest, state: PoolState, now: float, rng: random.Random) -> None:
        self.request = request
        self.state = state
        self.now = now
        self.rng = rng
        self._chain: BlockHashes | None = None
        self._matches: dict[str, dict[int, int]] = {}
        # (source, id(cands)) → (cands, matched blocks of each): several scorers of a profile score the same
        # candidate list; holding ``cands`` keeps its id from being reused within the cycle
        self._lists: dict[tuple[str, int], tuple[list[EndpointState], list[int]]] = {}
        self._holders: dict[tuple[str, int], tuple[list[EndpointState], npt.NDArray[np.intp],
                                                   npt.NDArray[np.float64]]] = {}
        # id(cands) → (cands, positions in the pool's columns) for the sub-lists the filters leave
        self._positions: dict[int, tuple[list[EndpointState], npt.NDArray[np.intp] | None]] = {}

    @property
    def chain(self) -> BlockHashes:
        """The request's chained block hashes (lazily computed)."""
        c = self._chain
        if c is None:
            cfg = self.state.config
            c = self._chain = BlockHashes(self.request, cfg.block_size, cfg.max_prefix_blocks, self.state.chunk_memo)
        return c

    def matches(self, source: str) -> dict[int, int]:
        """Index slot → leading blocks of the prompt held there, per ``source`` (approximate: the router's
        assumed state; precise: the engines' KV events; hybrid: the KV events, plus the blocks of the most
        recent decisions whose events cannot have arrived yet: the speculative index).

        Hybrid, when neither holds the prompt anywhere and the speculative index is the smaller one
        (``PoolState.hybrid_fallback``): the router's decision memory (the approximate index) instead. A
        prefix every engine evicted then goes back where the router last sent it rather than to whichever
        endpoint is least loaded at that instant, so each tenant keeps one home and endpoints do not all
        end up caching every tenant; where an engine does report the prompt, its events decide, evictions
        included (400 tenants: TTFT p90 at or below the approximate index's in 4 of 4 seeds, against above
        it in 7 of 7 without the fallback)."""
        m = self._matches.get(source)
        if m is None:
            state = self.state
            precise = state.precise
            assumed = state.approx if source == "approximate" else state.speculative
            cands = state.pool_mask(self.request.model)
            if source == "hybrid" and assumed.masks and precise.masks:
                m = match_lazily(state.either, self.chain, cands)
            else:
                index = assumed if source == "approximate" or (source == "hybrid" and assumed.masks) else precise
                m = match_lazily(index, self.chain, cands) if index.masks else {}
            if not m and source == "hybrid" and state.hybrid_fallback and state.approx.masks:
                m = match_lazily(state.approx, self.chain, cands)
            self._matches[source] = m
        return m

    def matched_list(self, cands: list[EndpointState], source: str) -> list[int]:
        """Leading blocks of the prompt each candidate holds, aligned with ``cands`` (computed once per list)."""
        key = (source, id(cands))
        hit = self._lists.get(key)
        if hit is not None and hit[0] is cands:
            return hit[1]
        get = self.matches(source).get
        out = [get(st.slot, 0) for st in cands]
        self._lists[key] = (cands, out)
        return out

    def pool_columns(self, cands: list[EndpointState]) -> PoolColumns | None:
        """The pool's columns when ``cands`` is the whole pool (nothing filtered: the usual case), else None."""
        model = self.request.model
        if cands is self.state.pool(model):
            return self.state.columns(model)
        return None

    def positions(self, cands: list[EndpointState]) -> npt.NDArray[np.intp] | None:
        """``cands``' positions in the pool's columns (computed once per list; None when one is not a member)."""
        if not wide(len(cands)):
            return None
        hit = self._positions.get(id(cands))
        if hit is not None and hit[0] is cands:
            return hit[1]
        pos = self.state.columns(self.request.model).positions(cands)
        self._positions[id(cands)] = (cands, pos)
        return pos

    def inverse(self, cands: list[EndpointState]) -> npt.NDArray[np.intp] | None:
        """Pool position → index in ``cands`` (-1: not a candidate); None when ``cands`` is not a sub-list."""
        pos = self.positions(cands)
        if pos is None:
            return None
        inv = np.full(len(self.state.pool(self.request.model)), -1, dtype=np.intp)
        inv[pos] = np.arange(len(cands))
        return inv

    def keep(self, cands: list[EndpointState], mask: npt.NDArray[np.bool_]) -> list[EndpointState]:
        """The candidates where ``mask`` (aligned with ``cands``) holds, their positions remembered for the next
        plugins (a filter's result is read from the columns as the pool is)."""
        out = list(compress(cands, mask.tolist()))
        if (pos := self._column_positions(cands)) is not None:
            self._positions[id(out)] = (out, pos[mask])
        return out

    def _column_positions(self, cands: list[EndpointState]) -> npt.NDArray[np.intp] | None:
        if cands is self.state.pool(self.request.model):
            return np.arange(len(cands))
        return self.positions(cands)

    def column(self, cands: list[EndpointState], name: str) -> npt.NDArray[Any] | None:
        """The pool's column ``name`` aligned with ``cands``: the column itself, read-only, for the whole pool; its
        entries gathered for a sub-list of it; None when ``cands`` is not one, or is short (read each endpoint
        then: ``COLUMNS_FROM``)."""
        if not wide(len(cands)):
            return None
        model = self.request.model
        cols = self.state.columns(model)
        arr: npt.NDArray[Any] = getattr(cols, name)
        if cands is self.state.pool(model):
            view = arr.view()
            view.flags.writeable = False  # shared by every plugin until the next report: never written through here
            return view
        pos = self.positions(cands)
        return None if pos is None else arr[pos]

    def load_arrays(self, cands: list[EndpointState]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """In-flight uncached tokens and effective prefill rate of each candidate, as arrays aligned with
        ``cands`` (the pool's own columns when ``cands`` is the pool: never written here)."""
        cols = self.pool_columns(cands)
        if cols is not None:
            return cols.tokens, cols.rate
        tokens, rate = self.column(cands, "tokens"), self.column(cands, "rate")
        if tokens is not None and rate is not None:
            return tokens, rate
        n = len(cands)
        return (np.fromiter((st.inflight_tokens for st in cands), np.float64, n),
                np.fromiter((st.effective_rate for st in cands), np.float64, n))

    def holders(self, cands: list[EndpointState], source: str) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        """The candidates holding some of the prompt: their indexes in ``cands`` and the leading blocks each
        holds (computed once per list). A match names only the endpoints holding the prompt's first block,
        so scorers set those few entries instead of computing every candidate's."""
        key = (source, id(cands))
        hit = self._holders.get(key)
        if hit is not None and hit[0] is cands:
            return hit[1], hit[2]
        m = self.matches(source)
        cols = self.pool_columns(cands)
        if cols is not None:  # every slot of a match belongs to the pool (the pool is the match's candidate mask)
            idx = cols.table[np.fromiter(m, np.intp, len(m))]
            blocks = np.fromiter(m.values(), np.float64, len(m))
        elif (inv := self.inverse(cands)) is not None:  # a sub-list of the pool: through its positions
            t = self.state.columns(self.request.model).table[np.fromiter(m, np.intp, len(m))]
            at = np.where(t >= 0, inv[t], -1)  # (a match names pool members only; -1 guarded all the same)
            keep = at >= 0
            idx, blocks = at[keep], np.fromiter(m.values(), np.float64, len(m))[keep]
        else:
            where = {st.slot: i for i, st in enumerate(cands)}
            pairs = [(where[slot], b) for slot, b in m.items() if slot in where]
            idx = np.array([i for i, _ in pairs], dtype=np.intp)
            blocks = np.array([b for _, b in pairs], dtype=np.float64)
        self._holders[key] = (cands, idx, blocks)
        return idx, blocks

    def uncached_list(self, cands: list[EndpointState], source: str) -> list[int]:
        """``uncached_tokens`` of every candidate, aligned with ``cands`` (one pass)."""
        prompt = self.request.num_prompt_tokens
        if not self.matches(source):
            return [prompt] * len(cands)
        bs = self.state.config.block_size
        blocks = self.matched_list(cands, source)
        if not blocks or max(blocks) * bs <= prompt:  # usual (hashes from the prompt): no clamp, in C
            return list(map(sub, repeat(prompt), map(mul, blocks, repeat(bs))))
        return [prompt - (x if (x := b * bs) < prompt else prompt) for b in blocks]

    def matched_tokens(self, st: EndpointState, source: str) -> int:
        """Prompt tokens the endpoint is believed to hold (never more than the prompt)."""
        blocks = self.matches(source).get(st.slot, 0)
        return min(blocks * self.state.config.block_size, self.request.num_prompt_tokens)

    def uncached_tokens(self, st: EndpointState, source: str) -> int:
        """Prompt tokens the endpoint would have to prefill for this request."""
        return self.request.num_prompt_tokens - self.matched_tokens(st, source)
