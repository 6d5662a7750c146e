"""Properties over random clusters (hypothesis): safety, determinism, fast path = reference, policies."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.placement.domain import (
    GIB,
    Backend,
    Category,
    Decision,
    GgufSpec,
    Gpu,
    GpuSelector,
    Instance,
    InstanceState,
    ModelFile,
    ModelFileState,
    ModelSpec,
    PlacementStrategy,
    ResourceRequest,
    Worker,
)
from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import (
    filter_rows,
    place,
    requirements,
    run_filters,
    run_fitting,
    run_scoring,
)
from shared.core.placement.snapshot import ClusterSnapshot

NOW = 1000.0
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PRODUCTS = {24: "L4", 48: "L40S", 80: "H100-SXM-80GB"}


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Worker], list[Instance], list[ModelFile]]:
    """Random workers (mixed GPU sizes, external use, cordons, stale heartbeats) and instances."""
    workers: list[Worker] = []
    instances: list[Instance] = []
    files: list[ModelFile] = []
    for w in range(draw(st.integers(1, 9))):
        name = f"w{w}"
        size = draw(st.sampled_from([24, 48, 80]))
        gpus = tuple(
            Gpu(index=i, product=PRODUCTS[size], vram_total=size * GIB,
                vram_used=draw(st.sampled_from([0, 0, 0, 4, 20])) * GIB,
                schedulable=draw(st.booleans()) or draw(st.booleans()) or draw(st.booleans()))
            for i in range(draw(st.integers(0, 4)))
        )
        workers.append(Worker(
            name=name, gpus=gpus, ram_total=draw(st.sampled_from([32, 256])) * GIB,
            ram_used=draw(st.sampled_from([0, 8])) * GIB,
            cpu_total=draw(st.sampled_from([0, 16, 64])) * 1000, cpu_used=draw(st.sampled_from([0, 0, 6])) * 1000,
            last_heartbeat=NOW - draw(st.sampled_from([0, 1, 2, 30])),
            cordoned=draw(st.integers(0, 9)) == 0,
            labels={"zone": draw(st.sampled_from(["a", "b"]))},
        ))
        for gpu in gpus:
            if draw(st.integers(0, 3)) == 0:
                claim = draw(st.sampled_from([5, 10, int(size * 0.9)])) * GIB
                instances.append(Instance(id=f"i{name}-{gpu.index}", model=draw(st.sampled_from(["m", "x", "y"])),
                                          state=InstanceState.RUNNING, worker=name, gpu_indexes=(gpu.index,),
                                          vram_claims=(claim,), cpu_claim=draw(st.sampled_from([0, 4000]))))
        if draw(st.booleans()):
            files.append(ModelFile(source="m", worker=name, state=ModelFileState.READY))
    return workers, instances, files


@st.composite
def models(draw: st.DrawFn) -> ModelSpec:
    """Random model specs: vLLM LLMs, embeddings, TP sizes, selectors, strategies."""
    kind = draw(st.sampled_from(["llm", "llm", "embedding", "tp2", "typed", "gguf"]))
    strategy = draw(st.sampled_from(list(PlacementStrategy)))
    weights = draw(st.sampled_from([1, 5, 12, 30, 60])) * GIB
    selector = {"zone": "a"} if draw(st.integers(0, 4)) == 0 else {}
    base = {"name": "m", "source": "m", "weight_bytes": weights, "placement_strategy": strategy,
            "worker_selector": selector, "ram_claim": draw(st.sampled_from([0, 0, 16])) * GIB,
            "cpu_claim": draw(st.sampled_from([None, 0, 4000, 12000]))}
    if kind == "gguf":
        layers = GgufSpec(total_layers=draw(st.sampled_from([16, 40])), layer_bytes=draw(st.sampled_from([1, 2])) * GIB,
                          non_layer_bytes=GIB, kv_bytes_per_token_per_layer=0)
        return ModelSpec(name="m", source="m.gguf", backend=Backend.LLAMA_CPP, gguf=layers, placement_strategy=strategy,
                         cpu_offloading=draw(st.booleans()))
    if kind == "embedding":
        return ModelSpec(categories=(Category.EMBEDDING,), **base)
    if kind == "tp2":
        return ModelSpec(backend_parameters=("--tensor-parallel-size=2",), **base)
    if kind == "typed":
        return ModelSpec(gpu_selector=GpuSelector(gpu_type="L40S"), **base)
    return ModelSpec(backend=draw(st.sampled_from([Backend.VLLM, Backend.SGLANG])), **base)


def build(parts: tuple[list[Worker], list[Instance], list[ModelFile]], seed: int = 0) -> ClusterSnapshot:
    workers, instances, files = (list(p) for p in parts)
    rng = random.Random(seed)
    rng.shuffle(workers)
    rng.shuffle(instances)
    return ClusterSnapshot.from_parts(workers, instances, files)


@SETTINGS
@given(clusters(), models())
def test_no_candidate_claims_more_than_a_gpus_allocatable_vram(parts, model):
    snap = build(parts)
    req = requirements(model)
    assert isinstance(req, ResourceRequest)
    survivors = run_filters(snap, model, NOW).survivors
    for exhaustive in (False, True):
        for cand in run_fitting(snap, model, req, survivors, exhaustive=exhaustive).candidates:
            shares = [(cand.worker, cand.gpu_indexes, cand.vram_claims, cand.ram_claim, cand.cpu_claim)]
            shares += [(s.worker, s.gpu_indexes, s.vram_claims, s.ram_claim, s.cpu_claim) for s in cand.subordinates]
            for name, indexes, claims, ram, cpu in shares:
                assert cand.overcommit is None
                assert ram == 0 or ram <= snap.ram_allocatable(name)
                assert cpu == 0 or cpu <= snap.cpu_allocatable(name)
                for index, claim in zip(indexes, claims, strict=True):
                    assert claim <= snap.gpu_allocatable(name, index)


@SETTINGS
@given(clusters(), models())
def test_the_filter_mask_names_exactly_the_survivors_and_reports_of_run_filters(parts, model):
    snap = build(parts)
    mask, reports = filter_rows(snap, model, NOW)
    expected = run_filters(snap, model, NOW)
    assert tuple(snap.names_where(mask)) == expected.survivors
    assert reports == expected.reports


@SETTINGS
@given(clusters(), models(), st.integers(0, 1000))
def test_same_input_same_decision_whatever_the_event_order(parts, model, seed):
    first = place(build(parts), model, NOW)
    assert place(build(parts), model, NOW) == first
    assert place(build(parts, seed), model, NOW) == first


@SETTINGS
@given(clusters(), models())
def test_fast_path_gives_exactly_the_decision_of_the_exhaustive_reference(parts, model):
    snap = build(parts)
    for _ in range(3):  # several replicas, each seeing the previous
        fast = place(snap, model, NOW)
        reference = place(snap, model, NOW, exhaustive=True)
        assert fast == reference
        if not isinstance(fast, Decision):
            break
        # the staged path the bus services run (filters → fitting → scoring) agrees too
        req = requirements(model)
        assert isinstance(req, ResourceRequest)
        survivors = run_filters(snap, model, NOW).survivors
        for exhaustive in (False, True):
            fit = run_fitting(snap, model, req, survivors, exhaustive=exhaustive)
            staged = run_scoring(snap, model, fit.candidates)
            assert (staged.candidate, staged.score, staged.breakdown) == (fast.candidate, fast.score, fast.breakdown)
            # a shortlist always holds place()'s choice; top=1 is exactly that choice
            for top in (1, 3):
                short = run_fitting(snap, model, req, survivors, exhaustive=exhaustive, top=top).candidates
                assert len(short) <= top and fast.candidate in short
        snap.upsert_instance(instance_from_decision(fast, f"new-{len(snap.instances())}"))


@SETTINGS
@given(st.integers(2, 6), st.integers(1, 4), st.sampled_from([5, 12, 30]), clusters())
def test_spread_puts_k_replicas_on_k_distinct_workers_when_k_empty_identical_workers_fit(k, gpus, size, noise):
    workers = [Worker(name=f"empty{i}", gpus=tuple(Gpu(index=g, vram_total=80 * GIB) for g in range(gpus)),
                      ram_total=256 * GIB, last_heartbeat=NOW) for i in range(k)]
    # the other workers may be anything, even partly used by this model
    snap = ClusterSnapshot.from_parts(workers + list(noise[0]), noise[1], noise[2])
    model = ModelSpec(name="m", weight_bytes=size * GIB, placement_strategy=PlacementStrategy.SPREAD)
    chosen = []
    for r in range(k):
        d = place(snap, model, NOW)
        assert isinstance(d, Decision)
        chosen.append(d.candidate.worker)
        snap.upsert_instance(instance_from_decision(d, f"r{r}"))
    assert len(set(chosen)) == k


@SETTINGS
@given(st.integers(2, 5), st.integers(2, 4), st.sampled_from([5, 12, 30]), st.sampled_from(["m", "other"]),
       st.integers(0, 4))
def test_binpack_prefers_an_already_used_worker_when_it_fits(n, gpus, size, owner, used_index):
    workers = [Worker(name=f"w{i}", gpus=tuple(Gpu(index=g, vram_total=80 * GIB) for g in range(gpus)),
                      ram_total=256 * GIB, last_heartbeat=NOW) for i in range(n)]
    used = workers[used_index % n].name
    snap = ClusterSnapshot.from_parts(workers, [Instance(id="x", model=owner, state=InstanceState.RUNNING, worker=used,
                                                         gpu_indexes=(0,), vram_claims=(72 * GIB,))])
    model = ModelSpec(name="m", weight_bytes=size * GIB, placement_strategy=PlacementStrategy.BINPACK)
    d = place(snap, model, NOW)
    assert isinstance(d, Decision) and d.candidate.worker == used


@SETTINGS
@given(clusters(), st.integers(1, 5), st.integers(1, 2), st.data())
def test_manual_selection_never_gives_two_replicas_the_same_gpu(parts, replicas, per_replica, data):
    snap = build(parts)
    all_gpus = [f"{w.name}:{g.index}" for w in parts[0] for g in w.gpus]
    if not all_gpus:
        return
    ids = data.draw(st.lists(st.sampled_from(all_gpus), min_size=1, max_size=8, unique=True))
    model = ModelSpec(name="m", weight_bytes=5 * GIB, replicas=replicas,
                      gpu_selector=GpuSelector(gpu_ids=tuple(ids), gpus_per_replica=per_replica))
    held = [(i.worker, g) for i in snap.instances("m") for g in i.gpu_indexes]
    for r in range(replicas):
        d = place(snap, model, NOW)
        if not isinstance(d, Decision):
            break
        c = d.candidate
        taken = [(c.worker, g) for g in c.gpu_indexes] + [(s.worker, g) for s in c.subordinates for g in s.gpu_indexes]
        assert not set(taken) & set(held)
        assert len(set(taken)) == len(taken)
        assert all(f"{w}:{g}" in ids for w, g in taken)
        held += taken
        snap.upsert_instance(instance_from_decision(d, f"manual-{r}"))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([8, 16, 32, 64]), st.sampled_from([0, 4, 12]), st.integers(0, 2)),
                min_size=1, max_size=8),
       st.sampled_from(list(PlacementStrategy)), st.sampled_from([10, 20, 40]))
def test_cpu_only_fast_path_matches_the_reference(specs, strategy, layers):
    workers = [Worker(name=f"c{i}", ram_total=ram * GIB, ram_used=used * GIB, last_heartbeat=NOW)
               for i, (ram, used, _) in enumerate(specs)]
    instances = [Instance(id=f"x{i}-{k}", model="m" if k == 0 else "x", state=InstanceState.RUNNING,
                          worker=f"c{i}", ram_claim=2 * GIB)
                 for i, (_, _, n) in enumerate(specs) for k in range(n)]
    snap = ClusterSnapshot.from_parts(workers, instances)
    spec = GgufSpec(total_layers=layers, layer_bytes=GIB // 4, non_layer_bytes=GIB // 2, kv_bytes_per_token_per_layer=0)
    model = ModelSpec(name="m", backend=Backend.LLAMA_CPP, gguf=spec, cpu_offloading=True, placement_strategy=strategy)
    for r in range(3):
        fast, reference = place(snap, model, NOW), place(snap, model, NOW, exhaustive=True)
        assert fast == reference
        if not isinstance(fast, Decision):
            break
        assert fast.candidate.strategy == "cpu_only"
        snap.upsert_instance(instance_from_decision(fast, f"cpu-{r}"))
