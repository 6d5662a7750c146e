"""The pure placement core: snapshot, requirements, filter → fit → score stages, and scale-down ranking.

Public API (stable; additions only):

- ``ClusterSnapshot`` / ``SnapshotConfig``: in-memory cluster state updated from events.
- ``requirements(model, arch=None, gguf=None) -> ResourceRequest | Reason``
- ``run_filters(snapshot, model, now, profile) -> FilterResult``
- ``run_fitting(snapshot, model, request, survivors, profile) -> FitResult``
- ``run_scoring(snapshot, model, candidates, profile, filters=()) -> Decision``
- ``place(snapshot, model, now, profile, request=None, arch=None, gguf=None) -> Decision | Unschedulable``
- ``scale_down_order(snapshot, model, now, profile, instances=None) -> tuple[ScaleDownEntry, ...]``
- ``instance_from_decision(decision, instance_id, created_at=0.0) -> Instance``
- fast path for single-GPU candidates (no ``Candidate`` built): ``fit_gpus(snapshot, model, request,
  survivors, profile) -> GpuFit | None``, ``score_gpus(snapshot, model, fit, profile) -> Decision | None``;
  located once and rescored per replica: ``Positions``, ``still_fitting``, ``score_positions``
- ``Profile`` / ``ScorerConfig`` / ``DEFAULT_PROFILE`` / ``profile_from_json`` / ``profile_from_yaml``
"""

from shared.core.placement.fastpath import Positions, score_positions, still_fitting
from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import (
    GpuFit,
    fit_gpus,
    place,
    requirements,
    run_filters,
    run_fitting,
    run_scoring,
    scale_down_order,
    score_gpus,
)
from shared.core.placement.profile import DEFAULT_PROFILE, Profile, ScorerConfig
from shared.core.placement.registry import profile_from_json, profile_from_yaml, validate_profile
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig

__all__ = [
    "DEFAULT_PROFILE",
    "ClusterSnapshot",
    "GpuFit",
    "Positions",
    "Profile",
    "ScorerConfig",
    "SnapshotConfig",
    "fit_gpus",
    "instance_from_decision",
    "place",
    "profile_from_json",
    "profile_from_yaml",
    "requirements",
    "run_filters",
    "run_fitting",
    "run_scoring",
    "scale_down_order",
    "score_gpus",
    "score_positions",
    "still_fitting",
    "validate_profile",
]
