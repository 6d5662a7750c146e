"""The scale-down scorer interface: a keep-score per existing instance (lowest removed first)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Instance
from shared.core.placement.plugin_args import Configurable


class ScaleDownScorer(Configurable, ABC):
    """Scores how much an instance is worth keeping, in ``[0, max_score]``."""

    name: ClassVar[str]
    max_score: ClassVar[float]

    @abstractmethod
    def score(self, ctx: PlacementContext, instances: Sequence[Instance]) -> list[float]:
        """One keep-score per instance (normalisations may look at all of them)."""
