"""Fit-strategy plugins, registered by name (one module each), tried in profile order."""

from __future__ import annotations

from shared.core.placement.fitting.base import FitOutcome, FitStrategy
from shared.core.placement.fitting.cpu_only import CpuOnly, RowBatch
from shared.core.placement.fitting.manual import Manual
from shared.core.placement.fitting.multi_gpu import MultiGpu
from shared.core.placement.fitting.multi_worker import MultiWorker
from shared.core.placement.fitting.partial_offload import PartialOffload
from shared.core.placement.fitting.single_gpu import GpuBatch, SingleGpu

FIT_STRATEGIES: dict[str, type[FitStrategy]] = {
    Manual.name: Manual,
    SingleGpu.name: SingleGpu,
    MultiGpu.name: MultiGpu,
    MultiWorker.name: MultiWorker,
    PartialOffload.name: PartialOffload,
    CpuOnly.name: CpuOnly,
}

__all__ = ["FIT_STRATEGIES", "FitOutcome", "FitStrategy", "GpuBatch", "RowBatch"]
