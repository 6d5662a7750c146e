"""Each pipeline stage's pure step over an in-memory snapshot (no broker started, no servers)."""

from __future__ import annotations

from typing import TypeVar

import msgspec
import pytest

from services.filter.service import FilterService
from services.fitting.service import FittingService
from services.scoring.service import ScoringService
from shared.bus.messages import PlacementFiltered, PlacementFitted, PlacementItem, PlacementRequest, PlacementScored
from shared.core.placement.domain import GIB, Category, Gpu, ModelSpec, PlacementStrategy, Worker
from shared.settings import Settings

NOW = 1000.0

EMB = ModelSpec(name="emb", weight_bytes=6 * GIB, categories=(Category.EMBEDDING,))
GOLD = ModelSpec(name="gold", weight_bytes=6 * GIB, worker_selector={"tier": "gold"})
HUGE = ModelSpec(name="huge", vram_claim=500 * GIB)
UNKNOWN_SIZE = ModelSpec(name="mystery")


def workers() -> list[Worker]:
    return [
        Worker(name=f"w{i}", gpus=tuple(Gpu(index=g, vram_total=80 * GIB) for g in range(2)),
               ram_total=256 * GIB, last_heartbeat=NOW - 1)
        for i in range(4)
    ]


S = TypeVar("S", FilterService, FittingService, ScoringService)


def stage(kind: type[S]) -> S:
    svc = kind(Settings(), clock=lambda: NOW)
    for w in workers():
        svc.snapshot.upsert_worker(w)
        svc.feed.inventory[w.name] = w
    return svc


def request(spec: ModelSpec, n: int) -> PlacementRequest:
    items = tuple(PlacementItem(instance_id=f"{spec.name}-{k}", model=spec.name) for k in range(n))
    return PlacementRequest(batch_id="b1", items=items, specs={spec.name: spec})


def test_filter_passes_survivors_on() -> None:
    passed, failed = stage(FilterService).filter_request(request(EMB, 2))
    assert failed is None and passed is not None
    res = passed.result("emb")
    assert res is not None and res.survivors == ("w0", "w1", "w2", "w3")


def test_filter_sends_unschedulable_straight_to_scored_when_nothing_survives() -> None:
    passed, failed = stage(FilterService).filter_request(request(GOLD, 1))
    assert passed is None and failed is not None
    (outcome,) = failed.outcomes
    assert outcome.unschedulable is not None and outcome.unschedulable.filters


def test_a_verdict_of_nothing_surviving_stays_small_whatever_the_fleet() -> None:
    from shared.bus.messages import encode
    from shared.core.placement.domain import MAX_EXPLAINED

    svc = FilterService(Settings(), clock=lambda: NOW)
    for i in range(1_200):  # a 64-replica request whose selector matches no node: a reason per node per replica
        svc.snapshot.upsert_worker(Worker(name=f"gpu-node-{i:05d}", labels={"tier": "silver"}, last_heartbeat=NOW,
                                          gpus=tuple(Gpu(index=g, vram_total=80 * GIB) for g in range(8)),
                                          ram_total=1024 * GIB))
    passed, failed = svc.filter_request(request(GOLD, 64))
    assert passed is None and failed is not None and len(failed.outcomes) == 64
    verdict = failed.outcomes[0].unschedulable
    assert verdict is not None
    emptied = next(r for r in verdict.filters if r.kept == 0)
    assert (emptied.total, len(emptied.dropped)) == (1_200, MAX_EXPLAINED)  # the counts whole, the first reasons
    assert "+1197 more" in verdict.message
    assert len(encode(failed)) < 1 << 20  # it was 8.6 MB: past what NATS carries, and dead-lettered as poison


@pytest.mark.parametrize(("spec", "fragment"), [(HUGE, "GiB"), (UNKNOWN_SIZE, "size unknown")])
def test_fitting_explains_what_cannot_be_placed(spec: ModelSpec, fragment: str) -> None:
    svc = stage(FittingService)
    flt = stage(FilterService).filter_request(request(spec, 1))[0]
    assert flt is not None
    fitted, failed = svc.fit(flt)
    assert fitted == [] and failed is not None
    un = failed.outcomes[0].unschedulable
    assert un is not None and fragment in un.message


def test_fitting_sends_single_gpu_candidates_as_columns() -> None:
    flt = stage(FilterService).filter_request(request(EMB, 3))[0]
    assert isinstance(flt, PlacementFiltered)
    fitted, failed = stage(FittingService).fit(flt)
    assert failed is None
    (msg,) = fitted
    cset = msg.candidate_set("emb")
    assert cset is not None and len(cset) == 8 and msg.fitted["emb"].candidates == ()


def test_scoring_spreads_a_batch_over_workers_by_assuming_each_choice() -> None:
    spread = msgspec.structs.replace(EMB, placement_strategy=PlacementStrategy.SPREAD)
    flt = stage(FilterService).filter_request(request(spread, 4))[0]
    assert flt is not None
    fitted, _ = stage(FittingService).fit(flt)
    scored = stage(ScoringService).score(fitted[0])
    chosen = [o.decision.candidate.worker for o in scored.outcomes if o.decision]
    assert sorted(chosen) == ["w0", "w1", "w2", "w3"]


def test_scoring_never_picks_a_worker_cordoned_after_fitting() -> None:
    flt = stage(FilterService).filter_request(request(EMB, 4))[0]
    assert flt is not None
    fitted, _ = stage(FittingService).fit(flt)
    scoring = stage(ScoringService)
    w0 = scoring.snapshot.worker("w0")
    assert w0 is not None
    scoring.snapshot.upsert_worker(msgspec.structs.replace(w0, cordoned=True))
    scored = scoring.score(fitted[0])
    chosen = [o.decision.candidate.worker for o in scored.outcomes if o.decision]
    assert "w0" not in chosen and len(chosen) == 4


def test_scoring_reports_replicas_whose_candidates_were_all_taken() -> None:
    llm = ModelSpec(name="llm", weight_bytes=14 * GIB)  # 90% of a GPU each: 8 GPUs, 9 replicas
    flt = stage(FilterService).filter_request(request(llm, 9))[0]
    assert flt is not None
    fitted, _ = stage(FittingService).fit(flt)
    scored = stage(ScoringService).score(fitted[0])
    assert sum(o.decision is not None for o in scored.outcomes) == 8
    last = scored.outcomes[-1].unschedulable
    assert last is not None and "taken while this replica was in flight" in last.message


def test_a_model_fitting_cannot_handle_is_unschedulable_alone_and_the_others_are_fitted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    emb2 = ModelSpec(name="emb2", weight_bytes=8 * GIB, categories=(Category.EMBEDDING,))
    items = (PlacementItem(instance_id="a", model="emb"), PlacementItem(instance_id="b", model="emb2"))
    passed, _ = stage(FilterService).filter_request(
        PlacementRequest(batch_id="b1", items=items, specs={"emb": EMB, "emb2": emb2}))
    assert passed is not None
    fitting = stage(FittingService)
    fit_model = fitting.fit_model

    def breaks_on_emb2(spec: ModelSpec, *args: object) -> object:
        if spec.name == "emb2":  # a spec the core cannot fit (before: an overflow that failed the whole message)
            raise OverflowError("Python int too large to convert to C long")
        return fit_model(spec, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(fitting, "fit_model", breaks_on_emb2)
    fitted, scored = fitting.fit(passed)
    assert [m for f in fitted for m in f.request.specs] == ["emb"]
    assert scored is not None and [o.item.model for o in scored.outcomes] == ["emb2"]
    verdict = scored.outcomes[0].unschedulable
    assert verdict is not None and "fitting failed: OverflowError" in verdict.message


def test_filter_sends_a_survivor_list_shared_by_several_models_once() -> None:
    emb2 = ModelSpec(name="emb2", weight_bytes=6 * GIB, categories=(Category.EMBEDDING,))
    items = (PlacementItem(instance_id="a", model="emb"), PlacementItem(instance_id="b", model="emb2"))
    req = PlacementRequest(batch_id="b1", items=items, specs={"emb": EMB, "emb2": emb2})
    passed, _ = stage(FilterService).filter_request(req)
    assert passed is not None
    assert passed.survivor_sets == (("w0", "w1", "w2", "w3"),)
    first, second = passed.result("emb"), passed.result("emb2")
    assert first is not None and second is not None
    assert first.survivors == second.survivors == ("w0", "w1", "w2", "w3")


def test_fitting_splits_many_models_over_messages_keeping_each_models_items_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import services.fitting.service as fitting

    monkeypatch.setattr(fitting, "FITTED_WORKERS_PER_MESSAGE", 8)  # 4 workers per model: 2 models a message
    specs = {f"m{k}": ModelSpec(name=f"m{k}", weight_bytes=6 * GIB, categories=(Category.EMBEDDING,))
             for k in range(5)}
    items = tuple(PlacementItem(instance_id=f"m{k}-{r}", model=f"m{k}") for k in range(5) for r in range(2))
    flt, _ = stage(FilterService).filter_request(PlacementRequest(batch_id="b1", items=items, specs=specs))
    assert flt is not None
    fitted, failed = stage(FittingService).fit(flt)
    assert failed is None
    assert [sorted(m.columns) for m in fitted] == [["m0", "m1"], ["m2", "m3"], ["m4"]]
    assert len({m.request.batch_id for m in fitted}) == 3
    for msg in fitted:
        assert {i.model for i in msg.request.items} == set(msg.columns) == set(msg.request.specs)
    assert sorted(i.instance_id for m in fitted for i in m.request.items) == sorted(i.instance_id for i in items)


def test_scoring_never_reuses_positions_after_a_worker_left() -> None:
    flt = stage(FilterService).filter_request(request(EMB, 1))[0]
    assert flt is not None
    fitted, _ = stage(FittingService).fit(flt)
    scoring = stage(ScoringService)
    (first,) = scoring.score(fitted[0]).outcomes
    assert first.decision is not None
    gone = first.decision.candidate.worker
    scoring.snapshot.remove_worker(gone)
    scoring.snapshot.upsert_worker(Worker(name="w9", gpus=(Gpu(index=0, vram_total=80 * GIB),),
                                          ram_total=256 * GIB, last_heartbeat=NOW - 1))  # takes the freed row
    again = PlacementRequest(batch_id="b2", items=(PlacementItem(instance_id="emb-9", model="emb"),),
                             specs={"emb": EMB})
    (second,) = scoring.score(msgspec.structs.replace(fitted[0], request=again)).outcomes
    assert second.decision is not None and second.decision.candidate.worker not in (gone, "w9")


def test_fitting_reuses_a_models_candidates_across_scale_commands() -> None:
    svc = stage(FittingService)
    calls: list[str] = []
    real = svc._fit_now

    def counting(*args: object) -> object:
        calls.append("fit")
        return real(*args)  # type: ignore[arg-type]

    svc._fit_now = counting  # type: ignore[method-assign]
    for replicas in (3, 4, 5):
        spec = msgspec.structs.replace(EMB, replicas=replicas)
        flt, _ = stage(FilterService).filter_request(request(spec, 1))
        assert flt is not None
        svc.fit(flt)
    assert calls == ["fit"]
    flt, _ = stage(FilterService).filter_request(request(msgspec.structs.replace(EMB, replicas=1), 1))
    assert flt is not None
    svc.fit(flt)  # one replica may be placed differently (manual overcommit): not the same key
    assert calls == ["fit", "fit"]


def counted_fits(svc: FittingService) -> list[str]:
    calls: list[str] = []
    real = svc._fit_now

    def counting(*args: object) -> object:
        calls.append("fit")
        return real(*args)  # type: ignore[arg-type]

    svc._fit_now = counting  # type: ignore[method-assign]
    return calls


def fit_alone(svc: FittingService, spec: ModelSpec) -> PlacementFitted | PlacementScored:
    flt, _ = stage(FilterService).filter_request(request(spec, 1))
    assert flt is not None
    fitted, failed = svc.fit(flt)
    if failed is not None:
        return failed
    (one,) = fitted
    return one


def test_models_of_one_shape_share_fittings_candidates_under_their_own_names() -> None:
    svc = stage(FittingService)
    calls = counted_fits(svc)
    twin = msgspec.structs.replace(EMB, name="emb-twin", source="org/other-weights")
    first, second = fit_alone(svc, EMB), fit_alone(svc, twin)
    assert calls == ["fit"]
    assert isinstance(first, PlacementFitted) and isinstance(second, PlacementFitted)
    one, two = first.candidate_set("emb"), second.candidate_set("emb-twin")
    assert one is not None and two is not None and two.model == "emb-twin"
    assert (one.workers, one.gpus, one.claim) == (two.workers, two.gpus, two.claim)


@pytest.mark.parametrize(
    "change",
    [
        {"weight_bytes": 12 * GIB},  # another request
        {"cpu_offloading": True},
        {"distributed_inference_across_workers": True},
    ],
)
def test_models_of_another_shape_are_fitted_on_their_own(change: dict[str, object]) -> None:
    svc = stage(FittingService)
    calls = counted_fits(svc)
    fit_alone(svc, EMB)
    fit_alone(svc, msgspec.structs.replace(EMB, name="other", **change))
    assert calls == ["fit", "fit"]


def test_an_explanation_of_why_nothing_fits_is_never_lent_to_another_model() -> None:
    svc = stage(FittingService)
    calls = counted_fits(svc)
    huge_twin = msgspec.structs.replace(HUGE, name="huge-twin")
    first, second = fit_alone(svc, HUGE), fit_alone(svc, huge_twin)
    assert calls == ["fit", "fit"]
    assert isinstance(first, PlacementScored) and isinstance(second, PlacementScored)
    assert second.outcomes[0].item.model == "huge-twin"


def test_fitting_asks_the_core_for_what_a_spec_needs_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import services.fitting.service as fitting
    from shared.core.placement.pipeline import requirements as real

    svc = stage(FittingService)
    asked: list[str] = []

    def counting(spec: ModelSpec, arch: object = None) -> object:
        asked.append(spec.name)
        return real(spec, arch)  # type: ignore[arg-type]

    monkeypatch.setattr(fitting, "requirements", counting)
    for replicas in (3, 4, 5):  # scale commands: the request cannot change
        assert svc.requirements(msgspec.structs.replace(EMB, replicas=replicas))[0] == real(EMB)
    assert asked == ["emb"]


def test_fitting_estimates_a_manual_gpu_selection_for_each_replica_count() -> None:
    from shared.core.placement.domain import GpuSelector
    from shared.core.placement.pipeline import requirements

    svc = stage(FittingService)
    manual = ModelSpec(name="manual", weight_bytes=6 * GIB,
                       gpu_selector=GpuSelector(gpu_ids=("w0:0", "w0:1", "w1:0", "w1:1")))
    for replicas in (1, 2, 4, 2, 1):  # the selection is split among replicas: each count asks differently
        spec = msgspec.structs.replace(manual, replicas=replicas)
        request, shape = svc.requirements(spec)
        assert request == requirements(spec)
        assert shape == fitting_key(spec)


def fitting_key(spec: ModelSpec) -> bytes:
    from services.fitting.service import fit_key
    from shared.core.placement.domain import ResourceRequest
    from shared.core.placement.pipeline import requirements

    request = requirements(spec)
    assert isinstance(request, ResourceRequest)
    return fit_key(spec, request)


def test_fitting_keeps_a_shape_in_steady_use_while_more_shapes_than_it_keeps_pass_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import services.fitting.service as fitting

    monkeypatch.setattr(fitting, "SHAPES_KEPT", 4)
    svc = stage(FittingService)
    hot = svc.requirements(EMB)
    for n in range(12):  # one more shape after another, the hot one asked for in between
        svc.requirements(ModelSpec(name=f"m{n}", weight_bytes=(n + 1) * GIB, categories=(Category.EMBEDDING,)))
        assert svc.requirements(EMB) is hot  # remembered, not worked out again
