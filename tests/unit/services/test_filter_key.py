"""The filter shares one verdict between models of one shape within a request: no registered filter may read a
model's name or replica count, nor a source that is not a local path."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from services.filter.service import filter_key
from shared.core.placement.domain import GpuSelector, ModelSpec
from shared.core.placement.filters import FILTERS
from shared.core.placement.pipeline import run_filters
from shared.core.placement.profile import Profile
from tests.unit.placement.test_properties import NOW, SETTINGS, build, clusters, models

EVERY_FILTER = Profile(filters=tuple(FILTERS))


def _verdict(parts: object, spec: ModelSpec) -> tuple[object, object]:
    res = run_filters(build(parts), spec, NOW, EVERY_FILTER)  # type: ignore[arg-type]
    return res.survivors, res.reports


@SETTINGS
@given(clusters(), models(), st.text(min_size=1, max_size=12), st.integers(0, 50), st.sampled_from(
    ["other/source", "./local/dir", "/abs/path"]), st.booleans())
def test_models_of_one_filter_key_get_the_same_verdict_from_every_filter(parts, model, name, replicas, source,
                                                                         select):
    if select:  # the local-path filter only acts with explicitly selected GPUs
        model = msgspec.structs.replace(model, gpu_selector=GpuSelector(gpu_ids=("w0:0", "w1:1")))
    other = msgspec.structs.replace(model, name=name, replicas=replicas, source=source)
    if filter_key(other) == filter_key(model):
        assert _verdict(parts, other) == _verdict(parts, model)


def test_a_local_path_source_is_part_of_the_key_and_a_hub_source_is_not() -> None:
    base = ModelSpec(name="a", source="org/a", weight_bytes=1)
    assert filter_key(base) == filter_key(msgspec.structs.replace(base, name="b", source="org/b", replicas=9))
    local = msgspec.structs.replace(base, source="/models/a")
    assert filter_key(local) != filter_key(msgspec.structs.replace(local, source="/models/b"))
