"""What binpack's fast path keeps between decisions: every GPU's score, recomputed only for the rows that moved.

A GPU's binpack score reads its own row only (the worker's allocatable RAM and CPU, the GPU's allocatable VRAM)
and the claim, and a decision changes one or two rows; yet scoring 8,000 GPUs from scratch took most of a
decision at 1,000 workers. The scores are kept on the snapshot (``ClusterSnapshot.memo``, dropped whenever a
worker's inventory may change) per claim, and only rows whose stamp (``ClusterSnapshot.w_stamp``, set whenever
a row's allocatable resources are recomputed) moved are scored again. The same element-wise expressions over a
subset of rows give each element the same value to the last bit, so the decision is the full computation's;
property tests hold it to the reference path over random event sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.core.placement import lru
from shared.core.placement.snapshot import ClusterSnapshot, FloatArray, IntArray

_MEMO = "binpack.rows"
_KEPT = 4  # memos kept (one per claim in use: models of one shape share one), the least recently used dropped
# (``lru``: a claim in steady use stays kept)

RowScorer = Callable[[IntArray | slice, IntArray], FloatArray]
"""Scores of the given rows (an index array, or a slice of every row) from those rows' claims."""


@dataclass
class RowScores:
    """Scores of every ``[row, slot]`` for one claim, with the row stamps they were computed at."""

    layout: int
    key: tuple[object, ...]
    claims: IntArray  # full ``[row, slot]`` shape
    stamp: IntArray
    scores: FloatArray


def row_scores(snap: ClusterSnapshot, claims: IntArray, key: tuple[object, ...], score: RowScorer) -> FloatArray:
    """``score`` over every row (``snap.rows`` × GPU slots), recomputing only the rows that moved since the
    memo for ``key`` and these ``claims`` was made. A new array each call (callers may keep it)."""
    rows = snap.rows
    shape = (rows, snap.g_ok.shape[1])
    full = claims if claims.shape == shape else np.broadcast_to(claims, shape)  # the located claims are full
    # Compared by value, never by identity: a caller may refill one claims array between calls.
    memo: RowScores | None = lru.first(
        snap.memo, _MEMO, lambda m: m.key == key and m.layout == snap.layout and m.scores.shape == shape
        and np.array_equal(m.claims, full))
    stamp = snap.w_stamp[:rows]
    if memo is None:
        memo = RowScores(layout=snap.layout, key=key, claims=full.copy(), stamp=stamp.copy(),
                         scores=score(slice(0, rows), full))
        lru.keep(snap.memo, _MEMO, id(memo), memo, _KEPT)  # its id is unique while it is kept (kept alive)
        return memo.scores.copy()
    moved = np.flatnonzero(stamp != memo.stamp)
    if len(moved) > rows // 4:
        memo.scores = score(slice(0, rows), full)
    elif len(moved):
        memo.scores[moved] = score(moved, full[moved])
    memo.stamp[moved] = stamp[moved]
    return memo.scores.copy()
