"""The best single-GPU candidate from the scorers' columns, without summing them over every GPU.

The decision is the candidate with the highest key ``floor((0.0 + p1 + p2 + ...) × QUANTUM + 0.5)``, summed in
profile order, ties to the first worker by name, then its lowest GPU index. Summing every part over every GPU of
the cluster (8,000 at 1,000 workers) cost more than the scorers themselves: adding a per-worker ``(rows, 1)``
column to a ``(rows, slots)`` matrix broadcasts over a short inner axis, about three times a plain add.

When at most one part varies within a row (the others are per-worker columns), a row's best key is the key of
its best value of that part: a float addition, a multiplication by a positive constant and ``floor`` never
reverse an order (IEEE rounding is monotone). So the row maxima of that one part, summed with the per-worker
columns, give each row's best key over rows only; just the rows reaching the overall best are then summed in
full, with the same element-wise expressions (the same bits), to find every tied candidate. The choice, its
total and its breakdown are those of the full computation; otherwise (two parts vary within rows, another
shape, or a key that is not finite) ``best_gpu`` returns None and the caller sums everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shared.core.placement.snapshot import BoolArray, FloatArray, IntArray

_FEW_ROWS = 4  # up to this many best rows are finished in Python floats (usually one)
Part = tuple[str, FloatArray]  # a scorer's name and its weighted scores, shaped like the mask or (rows, 1)


def row_max(values: FloatArray, mask: BoolArray) -> FloatArray:
    """Each row's highest value over its candidates (−inf for a row without one).

    The maximum is taken down the columns of the transposed copy: a reduction along the short slot axis
    costs one inner loop per row, ten times the transposed one.
    """
    masked = np.where(mask, values, -np.inf)
    best: FloatArray = np.ascontiguousarray(masked.T).max(axis=0)
    return best


def keys_of(total: FloatArray, quantum: float) -> FloatArray:
    """``floor(total × quantum + 0.5)``, element-wise (a new array)."""
    keys = total * quantum
    keys += 0.5
    np.floor(keys, out=keys)
    return keys


def best_gpu(
    parts: Sequence[Part], mask: BoolArray, ranks: IntArray, g_index: IntArray, quantum: float
) -> tuple[int, int, float] | None:
    """(row, slot, total) of the best candidate of ``mask`` (see the module), or None when this shortcut does
    not apply. ``ranks`` are the rows' positions in name order, ``g_index`` the ``[row, slot]`` GPU indexes."""
    rows = mask.shape[0]
    varying = [k for k, (_, v) in enumerate(parts) if v.shape != (rows, 1)]
    if len(varying) > 1 or any(parts[k][1].shape != mask.shape for k in varying):
        return None
    row_total = np.zeros(rows, dtype=np.float64)
    for k, (_, values) in enumerate(parts):  # 0.0 + a + b + ..., in profile order, as the full sum
        np.add(row_total, row_max(values, mask) if k in varying else values[:, 0], out=row_total)
    if not varying:  # every part is per worker: a row's candidates all share its total
        row_total[~mask.any(axis=1)] = -np.inf
    row_keys = keys_of(row_total, quantum)
    best_key = row_keys.max()
    if not np.isfinite(best_key):
        return None  # no candidate, or a non-finite score: the full computation says what happens then
    return pick_in_rows(parts, mask, ranks, g_index, quantum, np.flatnonzero(row_keys == best_key), float(best_key))


def pick_in_rows(
    parts: Sequence[Part], mask: BoolArray, ranks: IntArray, g_index: IntArray, quantum: float,
    top_rows: IntArray, best_key: float,
) -> tuple[int, int, float] | None:
    """``best_gpu``'s last step: the best candidate within ``top_rows``, the rows whose best key is ``best_key``
    (the highest over all rows), each candidate's total summed in full there (None if none reaches it)."""
    if len(top_rows) <= _FEW_ROWS:
        return _pick_few(parts, mask, ranks, g_index, quantum, top_rows.tolist(), best_key)
    width = mask.shape[1]
    total = np.zeros((len(top_rows), width), dtype=np.float64)
    for _, values in parts:
        np.add(total, values[top_rows], out=total)
    keys = keys_of(total, quantum)
    keys[~mask[top_rows]] = -np.inf
    tied_r, tied_s = np.nonzero(keys == best_key)
    if len(tied_r) == 0:
        return None  # cannot happen (see the module); never guess
    rows_of = top_rows[tied_r]
    order = (ranks[rows_of] << 32) + g_index[rows_of, tied_s]
    pick = int(np.argmin(order))
    return int(rows_of[pick]), int(tied_s[pick]), float(total[tied_r[pick], tied_s[pick]])


def _pick_few(
    parts: Sequence[Part], mask: BoolArray, ranks: IntArray, g_index: IntArray, quantum: float,
    top_rows: list[int], best_key: float,
) -> tuple[int, int, float] | None:
    """``best_gpu``'s last step over a few rows in Python floats: the same IEEE double operations in the same
    order as numpy's (so the same bits), without a dozen numpy calls on arrays of a few elements."""
    best: tuple[int, int, int, float] | None = None  # (order, row, slot, total)
    for r in top_rows:
        columns = [values[r].tolist() for _, values in parts]
        for s, candidate in enumerate(mask[r].tolist()):
            if not candidate:
                continue
            total = 0.0
            for column in columns:
                total = total + column[s if len(column) > 1 else 0]
            if not math.isfinite(total) or math.floor(total * quantum + 0.5) != best_key:
                continue
            order = (int(ranks[r]) << 32) + int(g_index[r, s])
            if best is None or order < best[0]:
                best = (order, r, s, total)
    return None if best is None else (best[1], best[2], best[3])
