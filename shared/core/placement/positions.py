"""Candidates located in a snapshot's ``[row, slot]`` layout (see ``fastpath``): what decisions on them keep."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.core.placement.snapshot import BoolArray, ClusterSnapshot, IntArray


@dataclass(frozen=True)
class Positions:
    """Candidates located in one snapshot's ``[row, slot]`` layout.

    The candidates as dense ``[row, slot]`` matrices (which GPUs, what claim), the form the vectorised
    scorers take: built once per candidate set, so scoring each replica only re-checks room. Valid while
    the snapshot's ``layout`` is the one recorded here.
    """

    layout: int
    mask: BoolArray
    dense_claims: IntArray

    @classmethod
    def of(cls, snapshot: ClusterSnapshot, rows: IntArray, slots: IntArray, claims: IntArray) -> Positions:
        """The candidates at ``(rows[i], slots[i])`` claiming ``claims[i]``, densely over the current rows."""
        shape = (snapshot.rows, snapshot.g_ok.shape[1])
        mask = np.zeros(shape, dtype=np.bool_)
        dense = np.zeros(shape, dtype=np.int64)
        mask[rows, slots] = True
        dense[rows, slots] = claims
        return cls(layout=snapshot.layout, mask=mask, dense_claims=dense)
