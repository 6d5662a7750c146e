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
- ``Profile`` / ``ScorerConfig`` / ``DEFAULT_PROFILE`` / ``profile_from_json`` / ``profile_from_yaml``
"""

from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import (
    place,
    requirements,
    run_filters,
    run_fitting,
    run_scoring,
    scale_down_order,
)
from shared.core.placement.profile import (
    DEFAULT_PROFILE,
    Profile,
    ScorerConfig,
    profile_from_json,
    profile_from_yaml,
    validate_profile,
)
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig

__all__ = [
    "DEFAULT_PROFILE",
    "ClusterSnapshot",
    "Profile",
    "ScorerConfig",
    "SnapshotConfig",
    "instance_from_decision",
    "place",
    "profile_from_json",
    "profile_from_yaml",
    "requirements",
    "run_filters",
    "run_fitting",
    "run_scoring",
    "scale_down_order",
    "validate_profile",
]
