"""At most one action per key and period, remembering only the keys acted on within the period."""

from __future__ import annotations

PRUNE_FROM = 1024  # keys held before the expired ones are dropped


class PerKeyThrottle:
    """Lets an action through for a key at most once every ``every`` seconds.

    The keys come from the bus (a heartbeat's worker name asks that worker to register): a stream of ever new
    names must not grow what is remembered without end, so once more than ``PRUNE_FROM`` keys are held (and then
    twice as many as the last prune kept), those whose period is over are dropped: memory stays bounded by the
    keys of one period, at an amortised constant cost per call.
    """

    def __init__(self, every: float) -> None:
        self.every = every
        self._at: dict[str, float] = {}
        self._prune_at = PRUNE_FROM

    def allow(self, key: str, now: float) -> bool:
        """Whether the action for ``key`` may run now (and, if so, it counts as run)."""
        last = self._at.get(key)
        if last is not None and now - last < self.every:
            return False
        if last is None and len(self._at) >= self._prune_at:
            self._at = {k: t for k, t in self._at.items() if now - t < self.every}
            self._prune_at = max(PRUNE_FROM, 2 * len(self._at))
        self._at[key] = now
        return True

    def __len__(self) -> int:
        return len(self._at)
