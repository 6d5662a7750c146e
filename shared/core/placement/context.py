"""What every plugin reads during one placement: the snapshot, the model, its requirements and ``now``."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from shared.core.placement.domain import ModelSpec, ResourceRequest
from shared.core.placement.profile import Profile
from shared.core.placement.snapshot import ClusterSnapshot, GpuView, WorkerView


def gpu_type_matches(wanted: str, vendor: str, product: str) -> bool:
    """``H100`` matches ``H100-SXM-80GB`` and ``h100-sxm-80gb``; a vendor name matches all its GPUs."""
    want = wanted.strip().lower()
    prod = product.lower()
    return want in (prod, vendor.lower()) or prod.startswith(want + "-")


@dataclass
class PlacementContext:
    """Inputs of one placement, shared by the plugins of every stage."""

    snapshot: ClusterSnapshot
    model: ModelSpec
    profile: Profile
    now: float = 0.0
    request: ResourceRequest | None = None
    _views: dict[str, WorkerView] = field(default_factory=dict)

    @property
    def req(self) -> ResourceRequest:
        """The resource request (fitting stages always have one)."""
        if self.request is None:
            raise ValueError("this stage needs the model's resource request")
        return self.request

    @property
    def source(self) -> str:
        """The key model-file readiness is recorded under: the source, else the model name."""
        return self.model.source or self.model.name

    def view(self, name: str) -> WorkerView:
        """A worker's view, built once per placement."""
        found = self._views.get(name)
        if found is None:
            found = self._views[name] = self.snapshot.view(name)
        return found

    @cached_property
    def selected_ids(self) -> tuple[tuple[str, int], ...]:
        """Explicitly selected GPUs as (worker, index), in the given order, without duplicates."""
        selector = self.model.gpu_selector
        if selector is None:
            return ()
        out: dict[tuple[str, int], None] = {}  # ordered, and a set: 10,000 ids deduplicated by a list took 1 s
        for gpu_id in selector.gpu_ids:
            worker, _, index = gpu_id.rpartition(":")
            if not worker or not (index.isascii() and index.isdigit()):  # limits.decimal, inline
                continue  # reported by the gpu_selector filter, never fatal
            out[(worker, int(index))] = None
        return tuple(out)

    def gpu_eligible(self, gpu: GpuView) -> bool:
        """Schedulable and matching the model's GPU type and GPU labels."""
        if not gpu.schedulable:
            return False
        selector = self.model.gpu_selector
        if selector is None:
            return True
        if selector.gpu_type and not gpu_type_matches(selector.gpu_type, gpu.vendor, gpu.product):
            return False
        return all(gpu.labels.get(k) == v for k, v in selector.labels.items())

    def full_claim(self, gpu: GpuView) -> int:
        """What a utilisation-claiming backend takes on ``gpu``: ``floor(utilization × total)``."""
        return int(gpu.total * self.req.gpu_memory_utilization)
