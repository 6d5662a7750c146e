"""single_gpu: every GPU that holds one replica on its own is a candidate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.core.placement.context import PlacementContext, gpu_type_matches
from shared.core.placement.fitting.base import FitOutcome, FitStrategy, candidate, full_claims, host_rows, host_short
from shared.core.placement.snapshot import BoolArray, IntArray, WorkerView


@dataclass
class GpuBatch:
    """Single-GPU candidates in the snapshot's ``[row, slot]`` layout: which GPUs, and their VRAM claims.

    Scorers return a score matrix of the same shape; values where ``mask`` is False are ignored.
    """

    mask: BoolArray
    claims: IntArray
    ram_claim: int
    count: int
    cpu_claim: int = 0
    _workers: BoolArray | None = None

    def __len__(self) -> int:
        return self.count

    def worker_mask(self) -> BoolArray:
        """Rows that hold at least one candidate (computed once per batch)."""
        if self._workers is None:
            self._workers = np.asarray(self.mask.any(axis=1), dtype=np.bool_)
        return self._workers

    def positions(self) -> tuple[IntArray, IntArray]:
        """(rows, slots) of the candidates, in row-major order."""
        r, s = np.nonzero(self.mask)
        return r.astype(np.int64), s.astype(np.int64)


class SingleGpu(FitStrategy):
    """One worker, one GPU."""

    name = "single_gpu"

    def skip(self, ctx: PlacementContext) -> str | None:
        """Not when the parallel sizes ask for several GPUs."""
        count = ctx.req.gpu_count
        if count is not None and count > 1:
            return f"the parallel sizes ask for {count} GPUs"
        return None

    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """Reference path: visit every GPU of every worker."""
        out = FitOutcome()
        ram = ctx.req.ram
        for view in workers:
            if host_short(ctx, view, ram):
                continue
            for gpu in view.gpus:
                if not ctx.gpu_eligible(gpu):
                    continue
                claims = full_claims(ctx, [gpu])
                if claims is not None:
                    out.candidates.append(candidate(view.name, [gpu], claims, ram, self.name, cpu=ctx.req.cpu))
        return out

    def fit_batch(self, ctx: PlacementContext, survivors: BoolArray) -> GpuBatch | None:
        """Fast path over the snapshot's columns; None when the model needs the reference path."""
        selector = ctx.model.gpu_selector
        if selector is not None and selector.labels:
            return None
        snap, req = ctx.snapshot, ctx.req
        rows = snap.rows
        workers_ok = host_rows(ctx, survivors)
        ok = snap.g_ok[:rows] & workers_ok[:, None]
        if selector is not None and selector.gpu_type:
            wanted = selector.gpu_type
            codes = [c for c, (v, p) in enumerate(snap.type_names()) if gpu_type_matches(wanted, v, p)]
            ok &= np.isin(snap.g_type[:rows], codes)
        alloc = snap.g_alloc[:rows]
        if req.gpu_memory_utilization > 0:
            claim = snap.claim_column(req.gpu_memory_utilization)
            ok &= claim >= req.vram
            ok &= alloc >= claim
        else:
            claim = np.broadcast_to(np.int64(req.vram), alloc.shape)
            ok &= alloc >= req.vram
        return GpuBatch(mask=ok, claims=claim, ram_claim=req.ram, count=int(np.count_nonzero(ok)),
                        cpu_claim=req.cpu)
