"""Picker plugins, registered by type name (one module each)."""

from __future__ import annotations

from shared.core.routing.pickers.max_score import MaxScorePicker
from shared.core.routing.pickers.power_of_two import PowerOfTwoPicker
from shared.core.routing.pickers.random_pick import RandomPicker
from shared.core.routing.pickers.weighted_random import WeightedRandomPicker
from shared.core.routing.plugin import Picker

PICKERS: dict[str, type[Picker]] = {
    cls.type_name: cls for cls in (MaxScorePicker, WeightedRandomPicker, RandomPicker, PowerOfTwoPicker)
}

__all__ = ["PICKERS", "Picker"]
