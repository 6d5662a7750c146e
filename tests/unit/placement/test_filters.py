"""Filter chain (spec §4): each filter keeps or drops workers with a reason; the chain runs in order."""

from __future__ import annotations

import time

import pytest

from shared.core.limits import MAX_LIST
from shared.core.placement.domain import Backend, GpuSelector, ModelSpec
from shared.core.placement.filters import FILTERS
from shared.core.placement.filters.backend import version_tuple
from shared.core.placement.pipeline import run_filters
from shared.core.placement.profile import DEFAULT_FILTERS, Profile
from tests.unit.placement.helpers import NOW, ctx, gpu, snapshot, worker

W_EDGE = worker("edge", cluster="edge")
W_ZONE_A = worker("za", labels={"zone": "a", "tier": "gold"})
W_ZONE_B = worker("zb", labels={"zone": "b"})
W_STALE = worker("stale", last_heartbeat=NOW - 60)
W_CORDONED = worker("cordoned", cordoned=True)
W_CPU = worker("cpu", 0)
W_ROCM = worker("rocm", [gpu(0, vendor="rocm", product="MI250")])
W_METAL = worker("mac", [gpu(0, vendor="metal", product="M2")])
W_A100 = worker("a100", [gpu(0, product="A100-SXM-80GB")])
W_PATH = worker("haspath", local_paths=("/models/llama",))

CASES = [
    # (filter, model, worker, kept?, reason fragment)
    ("cluster", ModelSpec(name="m"), worker("w"), True, ""),
    ("cluster", ModelSpec(name="m"), W_EDGE, False, "cluster 'edge'"),
    ("cluster", ModelSpec(name="m", cluster="edge"), W_EDGE, True, ""),
    ("labels", ModelSpec(name="m", worker_selector={"zone": "a"}), W_ZONE_A, True, ""),
    ("labels", ModelSpec(name="m", worker_selector={"zone": "a"}), W_ZONE_B, False, "zone='a' wanted"),
    ("labels", ModelSpec(name="m", worker_selector={"tier": "gold"}), W_ZONE_B, False, "missing"),
    ("labels", ModelSpec(name="m"), W_ZONE_B, True, ""),
    ("status", ModelSpec(name="m"), worker("w"), True, ""),
    ("status", ModelSpec(name="m"), W_STALE, False, "NOT_READY"),
    ("status", ModelSpec(name="m"), W_CORDONED, False, "MAINTENANCE"),
    ("backend", ModelSpec(name="m"), worker("w"), True, ""),
    ("backend", ModelSpec(name="m"), W_ROCM, True, ""),
    ("backend", ModelSpec(name="m"), W_METAL, False, "vllm runs on cuda, rocm"),
    ("backend", ModelSpec(name="m"), W_CPU, False, "worker has cpu"),
    ("backend", ModelSpec(name="m", backend=Backend.LLAMA_CPP), W_METAL, True, ""),
    ("backend", ModelSpec(name="m", backend=Backend.LLAMA_CPP), W_CPU, True, ""),
    ("gpu_selector", ModelSpec(name="m", gpu_selector=GpuSelector(gpu_ids=("w:0",))), worker("w"), True, ""),
    ("gpu_selector", ModelSpec(name="m", gpu_selector=GpuSelector(gpu_ids=("x:0",))), worker("w"), False, "none of"),
    ("gpu_selector", ModelSpec(name="m", gpu_selector=GpuSelector(gpu_type="H100")), worker("w"), True, ""),
    ("gpu_selector", ModelSpec(name="m", gpu_selector=GpuSelector(gpu_type="H100")), W_A100, False, "no H100"),
    ("gpu_selector", ModelSpec(name="m", gpu_selector=GpuSelector(gpu_type="a100-sxm-80gb")), W_A100, True, ""),
    ("local_path", ModelSpec(name="m", source="/models/llama", gpu_selector=GpuSelector(gpu_ids=("haspath:0",))),
     W_PATH, True, ""),
    ("local_path", ModelSpec(name="m", source="/models/llama", gpu_selector=GpuSelector(gpu_ids=("w:0",))),
     worker("w"), False, "not present"),
    ("local_path", ModelSpec(name="m", source="/models/llama"), worker("w"), True, ""),  # no explicit GPUs
]


@pytest.mark.parametrize(("fname", "model", "w", "kept", "why"), CASES)
def test_filter_keeps_or_drops_with_reason(fname, model, w, kept, why):
    plugin = FILTERS[fname]()
    c = ctx(snapshot(w), model)
    reason = plugin.check(c, w) if plugin.active(c) else None
    assert (reason is None) is kept
    if not kept:
        assert why in reason
    if plugin.active(c):  # the vectorised mask agrees with the scalar check
        assert bool(plugin.keep_mask(c)[c.snapshot.row_of(w.name)]) is kept


def test_chain_runs_in_spec_order_and_reports_kept_of_total():
    snap = snapshot(worker("ok"), W_EDGE, W_STALE, W_ZONE_B)
    result = run_filters(snap, ModelSpec(name="m"), NOW)
    assert [r.filter for r in result.reports] == list(DEFAULT_FILTERS)
    assert [(r.kept, r.total) for r in result.reports] == [(3, 4), (3, 3), (3, 3), (2, 3), (2, 2), (2, 2)]
    assert result.survivors == ("ok", "zb")
    assert result.reports[0].dropped[0].subject == "edge"


def test_chain_stops_when_nothing_is_left():
    snap = snapshot(W_EDGE)
    result = run_filters(snap, ModelSpec(name="m"), NOW)
    assert [r.filter for r in result.reports] == ["cluster"]
    assert result.survivors == ()


def test_gpu_selector_reports_selected_gpus_missing_from_the_cluster():
    model = ModelSpec(name="m", gpu_selector=GpuSelector(gpu_ids=("w:0", "w:7", "ghost:0")))
    for exhaustive in (False, True):
        result = run_filters(snapshot(worker("w")), model, NOW, exhaustive=exhaustive)
        report = next(r for r in result.reports if r.filter == "gpu_selector")
        assert {d.subject for d in report.dropped} == {"w:7", "ghost:0"}


def test_fast_and_reference_filter_chains_agree():
    snap = snapshot(worker("ok"), W_EDGE, W_STALE, W_ZONE_A, W_ZONE_B, W_CPU, W_METAL, W_CORDONED)
    model = ModelSpec(name="m", worker_selector={"zone": "a"})
    assert run_filters(snap, model, NOW) == run_filters(snap, model, NOW, exhaustive=True)


@pytest.mark.parametrize("exhaustive", [False, True])
def test_malformed_gpu_ids_are_reported_not_fatal(exhaustive: bool) -> None:
    # "²" and "٣" are digits to str.isdigit, not to int(): they raised inside every filter run of the model
    model = ModelSpec(name="m", gpu_selector=GpuSelector(gpu_ids=("w:0", "nonsense", "w:x", "w:²", "w:٣", "w:-1")))
    result = run_filters(snapshot(worker("w")), model, NOW, exhaustive=exhaustive)
    report = next(r for r in result.reports if r.filter == "gpu_selector")
    assert {d.subject for d in report.dropped} == {"nonsense", "w:x", "w:²", "w:٣", "w:-1"}
    assert result.survivors == ("w",)


def test_the_most_gpu_ids_a_spec_may_hold_are_filtered_in_linear_time() -> None:
    ids = tuple(f"w{n // 8}:{n % 8}" for n in range(MAX_LIST))  # a pairwise duplicate check took 1.2 s of CPU
    model = ModelSpec(name="m", gpu_selector=GpuSelector(gpu_ids=(*ids, *ids)[:MAX_LIST]))
    started = time.thread_time()  # this thread only: threads other tests left running must not count
    result = run_filters(snapshot(worker("w0"), worker("w1")), model, NOW)
    assert time.thread_time() - started < 0.3
    assert result.survivors == ("w0", "w1")


@pytest.mark.parametrize(("version", "parsed"), [("12.1.1", (12, 1, 1)), ("12.²", (12, 0)), ("x.٣", (0, 0))])
def test_runtime_versions_count_parts_that_are_not_plain_numbers_as_zero(version: str, parsed: tuple[int, ...]) -> None:
    assert version_tuple(version) == parsed


@pytest.mark.parametrize(
    ("runtime", "kept"), [("12.4", True), ("12.1", True), ("11.8", False), ("", True), ("12", False)]
)
def test_backend_filter_checks_the_minimum_runtime_version_from_the_profile(runtime, kept):
    profile = Profile(min_runtime_version={"vllm": {"cuda": "12.1"}})
    w = worker("w", [gpu(0, runtime_version=runtime)])
    c = ctx(snapshot(w), ModelSpec(name="m"), profile=profile)
    plugin = FILTERS["backend"]()
    assert (plugin.check(c, w) is None) is kept
    assert bool(plugin.keep_mask(c)[0]) is kept
    if not kept:
        assert "cuda ≥ 12.1" in plugin.check(c, w)


def test_a_worker_naming_64_gpu_vendors_joins_and_the_backend_filter_stays_exact() -> None:
    # one registration naming 64 vendors overflowed the int64 vendor mask: no worker with a new vendor could join
    # any snapshot after it, and every service failed at start (its snapshot is built from the stored workers)
    many = worker("many", [gpu(i, vendor=f"v{i}") for i in range(64)])
    snap = snapshot(worker("cuda"), many)
    snap.upsert_worker(worker("amd", [gpu(0, vendor="rocm")]))
    snap.upsert_worker(worker("odd", [gpu(0, vendor="v63")]))  # a vendor past the first 62: on the shared bit
    for backend in Backend:
        model = ModelSpec(name="m", backend=backend)
        assert run_filters(snap, model, NOW) == run_filters(snap, model, NOW, exhaustive=True), backend
    plugin, c = FILTERS["backend"](), ctx(snap, ModelSpec(name="m"))
    assert [snap.name_of(r) for r in range(snap.rows) if plugin.keep_mask(c)[r]] == [
        n for n in ("cuda", "many", "amd", "odd") if plugin.check(c, snap.worker(n)) is None]


def test_a_worker_re_registering_with_new_gpu_names_leaves_a_bounded_table_and_the_same_verdicts() -> None:
    from shared.core.placement.domain import GpuSelector
    from shared.core.placement.snapshot import CODES_SLACK

    snap = snapshot(worker("steady", [gpu(0, product="H100-SXM-80GB"), gpu(1, product="A100-80GB")]))
    for i in range(3 * CODES_SLACK // 8):  # each registration names 8 new kinds and a new cluster
        snap.upsert_worker(worker("churn", [gpu(g, product=f"X{i}-{g}") for g in range(8)], cluster=f"c{i}"))
    assert len(snap.type_names()) <= CODES_SLACK + 8 * 2  # it grew by 8 codes a registration, for good
    assert len(snap._codes["cluster"]) <= CODES_SLACK + 2
    snap.upsert_worker(worker("churn", [gpu(g, product=f"Xlast-{g}") for g in range(8)]))  # the default cluster
    for wanted, survivors in (("H100-SXM-80GB", ("steady",)), ("A100-80GB", ("steady",)),
                              ("Xlast-3", ("churn",)), ("X0-0", ())):
        model = ModelSpec(name="m", gpu_selector=GpuSelector(gpu_type=wanted))
        got = run_filters(snap, model, NOW)
        assert got == run_filters(snap, model, NOW, exhaustive=True) and got.survivors == survivors, wanted
