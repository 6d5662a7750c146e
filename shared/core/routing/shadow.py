"""Shadow scheduling: profiles that score every request beside the acting one without acting.

A shadow run sees the same cycle (same hashes, same state) as the acting profile, never calls plugin
hooks and never touches the indexes or the in-flight accounting. Per shadow profile it counts how often
its first choice differs from the acting one and how much better its own choice scores than the acting
choice under the shadow's scoring (the "score delta": 0 when they agree; undefined when the shadow
filtered the acting choice out, counted separately).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ShadowStats:
    """Agreement of one shadow profile with the acting decisions."""

    requests: int = 0
    disagreements: int = 0
    refused_by_shadow: int = 0  # the shadow found no endpoint where the acting profile did
    acting_filtered_out: int = 0  # the shadow's filters dropped the acting choice
    delta_sum: float = 0.0
    delta_max: float = 0.0
    deltas: list[float] = field(default_factory=list)  # the last ``keep`` deltas, for percentiles
    keep: int = 10_000

    def observe(self, acting: str, shadow: str | None, scores: dict[str, float]) -> None:
        """Record one request: the acting choice, the shadow's choice and the shadow's totals."""
        self.requests += 1
        if shadow is None:
            self.refused_by_shadow += 1
            self.disagreements += 1
            return
        if shadow == acting:
            delta = 0.0
        else:
            self.disagreements += 1
            if acting not in scores:
                self.acting_filtered_out += 1
                return
            delta = scores[shadow] - scores[acting]
        self.delta_sum += delta
        self.delta_max = max(self.delta_max, delta)
        self.deltas.append(delta)
        if len(self.deltas) > self.keep:
            del self.deltas[: len(self.deltas) - self.keep]

    def export(self) -> dict[str, float]:
        """Plain figures: disagreement rate and score deltas."""
        scored = self.requests - self.refused_by_shadow - self.acting_filtered_out
        ds = sorted(self.deltas)
        p90 = ds[min(len(ds) - 1, int(0.9 * len(ds)))] if ds else 0.0
        return {
            "requests": float(self.requests),
            "disagreement_rate": self.disagreements / self.requests if self.requests else 0.0,
            "refused_by_shadow": float(self.refused_by_shadow),
            "acting_filtered_out": float(self.acting_filtered_out),
            "score_delta_mean": self.delta_sum / scored if scored else 0.0,
            "score_delta_p90": p90,
            "score_delta_max": self.delta_max,
        }
