"""The Redis state layer: worker-state and model-file caches, desired state, instances, claims ledger."""

from shared.state.store import CommitItem, StateStore, gpu_field

__all__ = ["CommitItem", "StateStore", "gpu_field"]
